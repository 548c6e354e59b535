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

# The whole pipeline on the built-in shapes dataset, on the CPU (runs land in logs/quickstart/).
RUNS := logs/quickstart
quickstart: $(STAMP)
	$(PY) -m t2i.data.convert shapes --out $(DATA)/shapes
	$(PY) train.py stage=tokenizer data=shapes paths.data_dir=$(DATA) hydra.run.dir=$(RUNS)/tokenizer
	$(PY) -m t2i.data.shards $(DATA)/shapes
	$(PY) eval.py task=oracle data=shapes paths.data_dir=$(DATA) hydra.run.dir=$(RUNS)/oracle
	$(PY) train.py experiment=vqgan_shapes paths.data_dir=$(DATA) hydra.run.dir=$(RUNS)/vqgan
	$(PY) eval.py task=reconstruct ckpt=$(RUNS)/vqgan/checkpoints/last.ckpt data=shapes split=val \
		paths.data_dir=$(DATA) hydra.run.dir=$(RUNS)/vqgan/eval
	$(PY) -m t2i.pretokenize --data $(DATA)/shapes --out $(DATA)/shapes_codes \
		--vqgan $(RUNS)/vqgan/checkpoints/last.ckpt
	$(PY) -m t2i.data.shards $(DATA)/shapes_codes

bench: $(STAMP)
	$(PY) experiments/bench_data.py
	$(PY) experiments/bench_vqgan.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
