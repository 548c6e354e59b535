# Every target creates .venv and installs what is missing, so a fresh machine needs only `make`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.14.1 torchvision==0.29.1
DATA   ?= data

.PHONY: setup test test-fast browser-deps demo quickstart bench clean gpu-wheels gpu-check

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The suite in two worker processes, a test file each at a time (its module fixtures built once): most tests wait on
# a Python start or a small model's kernels, so two files at once on two cores finish sooner than one after another.
test: $(STAMP) browser-deps
	$(PY) -m pytest -q -n 2 --dist loadfile

test-fast: $(STAMP) browser-deps
	$(PY) -m pytest -q -m 'not slow'

# The demo's browser test (tests/test_demo.py) drives Debian's chromium through Playwright (no browser
# download), and grids draw Chinese captions with a CJK font from a package: as root, apt installs
# what is missing; otherwise this says what to install and the browser test skips naming it.
browser-deps:
	@if [ -x /usr/bin/chromium ] && fc-list :lang=zh 2>/dev/null | grep -q .; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-wqy-microhei >/dev/null; \
	else \
		echo "browser-deps: not root: install Debian's chromium and a CJK font (apt-get install chromium fonts-wqy-microhei)"; \
	fi

# The web demo on the quickstart's GPT (python -m t2i.demo ckpt=... for any other): http://127.0.0.1:7860
demo: $(STAMP)
	$(PY) -m t2i.demo ckpt=$(GPT)

# The whole pipeline on the built-in shapes dataset, on the CPU (runs land in logs/quickstart/):
# data, tokenizer, oracle reference, VQGAN, code shards, GPT, a captioned grid for the prompts in
# experiments/prompts/shapes.txt, and the evaluation on 200 held-out test prompts (plain, with
# reranking, without guidance), then a summary: each stage's wall time, whether each training ran
# its steps, the scores against the targets (also logs/quickstart/summary.md). SEED is the training
# seed. FID/IS need torch-fidelity's Inception weights: FID=true downloads them, and also gives the
# VQGAN's rFID and LPIPS (torchvision's VGG16 weights, downloaded too). CLIP=true adds the Chinese-CLIP
# score and R-precision (OFA-Sys/chinese-clip-vit-base-patch16, downloaded once).
RUNS := logs/quickstart
SEED ?= 0
FID ?= false
CLIP ?= false
GPT := $(RUNS)/gpt/checkpoints/last.ckpt
quickstart: $(STAMP)
	$(PY) experiments/quickstart.py --data $(DATA) --runs $(RUNS) --seed $(SEED) $(if $(filter true,$(FID)),--fid) $(if $(filter true,$(CLIP)),--clip)

bench: $(STAMP)
	$(PY) experiments/bench_data.py
	$(PY) experiments/bench_vqgan.py
	$(PY) experiments/bench_generate.py
	$(PY) experiments/bench_train.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

# The GPU check (experiments/gpu_check.sh): wheels of what a GPU image may lack, downloaded beforehand
# (online) for the GPU machine's Python (GPU_PYTHON, e.g. 3.12), then the check itself on that machine.
GPU_PYTHON ?= 3.12
GPU_WHEELS := hydra-core==1.3.8 omegaconf==2.3.1 webdataset==1.0.2 braceexpand==0.1.7 torch-fidelity==0.4.0 lpips==0.1.4
gpu-wheels: $(STAMP)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
		--platform manylinux2014_x86_64 --platform any -d .whl $(GPU_WHEELS)
	$(PY) -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3  # a source release only

gpu-check:
	bash experiments/gpu_check.sh .whl
