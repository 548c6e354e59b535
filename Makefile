# Every target creates .venv and installs what is missing, so a fresh machine needs only `make`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.14.1 torchvision==0.29.1
DATA   ?= data

.PHONY: setup test test-fast quickstart bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m 'not slow'

# The whole pipeline on the built-in shapes dataset, on the CPU (runs land in logs/quickstart/):
# data, tokenizer, oracle reference, VQGAN, code shards, GPT, a captioned grid for the prompts in
# experiments/prompts/shapes.txt, and the evaluation on 200 held-out test prompts (plain, with
# reranking, without guidance). FID/IS need torch-fidelity's Inception weights: FID=true downloads
# them (or add `eval.inception_weights=PATH` to EVAL), and also gives the VQGAN's rFID and LPIPS
# (torchvision's VGG16 weights, downloaded too).
RUNS := logs/quickstart
VQGAN_STEPS ?= 2200
GPT_STEPS ?= 2200
FID ?= false
GPT := $(RUNS)/gpt/checkpoints/last.ckpt
EVAL := data=shapes split=test eval.num_prompts=200 eval.fid=$(FID) paths.data_dir=$(DATA)
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
