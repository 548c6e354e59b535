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

test: $(STAMP) browser-deps
	$(PY) -m pytest -q

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
# reranking, without guidance). FID/IS need torch-fidelity's Inception weights: FID=true downloads
# them (or add `eval.inception_weights=PATH` to EVAL), and also gives the VQGAN's rFID and LPIPS
# (torchvision's VGG16 weights, downloaded too). CLIP=true adds the Chinese-CLIP score and R-precision
# (OFA-Sys/chinese-clip-vit-base-patch16, downloaded once; or `eval.clip_model=PATH`).
RUNS := logs/quickstart
VQGAN_STEPS ?= 2200
GPT_STEPS ?= 2200
FID ?= false
GPT := $(RUNS)/gpt/checkpoints/last.ckpt
CLIP ?= false
EVAL := data=shapes split=test eval.num_prompts=200 eval.fid=$(FID) eval.clip=$(CLIP) paths.data_dir=$(DATA)
quickstart: $(STAMP)
	$(PY) -m t2i.data.convert shapes --out $(DATA)/shapes
	$(PY) train.py stage=tokenizer data=shapes paths.data_dir=$(DATA) hydra.run.dir=$(RUNS)/tokenizer
	$(PY) -m t2i.data.shards $(DATA)/shapes
	$(PY) eval.py task=oracle data=shapes paths.data_dir=$(DATA) hydra.run.dir=$(RUNS)/oracle
	$(PY) train.py experiment=vqgan_shapes trainer.max_steps=$(VQGAN_STEPS) \
		paths.data_dir=$(DATA) hydra.run.dir=$(RUNS)/vqgan
	$(PY) eval.py task=reconstruct ckpt=$(RUNS)/vqgan/checkpoints/last.ckpt data=shapes split=val \
		eval.rfid=$(FID) eval.lpips=$(FID) paths.data_dir=$(DATA) hydra.run.dir=$(RUNS)/vqgan/eval
	$(PY) -m t2i.pretokenize --data $(DATA)/shapes --out $(DATA)/shapes_codes \
		--vqgan $(RUNS)/vqgan/checkpoints/last.ckpt
	$(PY) -m t2i.data.shards $(DATA)/shapes_codes
	$(PY) train.py experiment=shapes trainer.max_steps=$(GPT_STEPS) paths.data_dir=$(DATA) hydra.run.dir=$(RUNS)/gpt
	$(PY) eval.py task=generate ckpt=$(GPT) prompts_file=experiments/prompts/shapes.txt sampling.samples_per_prompt=4 \
		hydra.run.dir=$(RUNS)/generate
	$(PY) eval.py ckpt=$(GPT) $(EVAL) eval.rerank=4 hydra.run.dir=$(RUNS)/eval
	$(PY) eval.py ckpt=$(GPT) $(EVAL) sampling.guidance_scale=1 hydra.run.dir=$(RUNS)/eval_no_guidance
	@cat $(RUNS)/oracle/results.json | $(PY) -c "import json,sys; print('oracle on real test images:', json.load(sys.stdin)['accuracy'])"
	@echo "guidance (checkpoint default), with and without reranking:"; cat $(RUNS)/eval/results.md
	@echo "no guidance:"; cat $(RUNS)/eval_no_guidance/results.md

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
