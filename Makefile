# me5 — `make help` lists the targets.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU machines get the local CPU wheel; with a GPU (nvidia-smi present) pip keeps/installs the CUDA build.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAS_GPU),torch>=2.4,torch==2.13.0)
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.DEFAULT_GOAL := help
.PHONY: help setup train test test-full lint format sweep-example bench bench-data bench-encode bench-mine report notebook clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q "$(TORCH_SPEC)" 2>&1 | { grep -v "is ignored" || true; }
	$(PIP) install -q -c constraints.txt -e ".[dev]" 2>&1 | { grep -v "is ignored" || true; }
	$(PY) -c "import torch, lightning, transformers, hydra, wandb, datasets, me5; print('torch', torch.__version__)"
	touch $@

setup: $(VENV)/.installed ## create .venv and install me5 with its test tools

train: setup ## run the embedded default: sample data, tiny model, stage 1 -> stage 2 -> evaluation (CPU, offline)
	$(PY) -m me5.train $(ARGS)

test: setup ## the default test suite (fast; skips `slow` and `gpu`)
	$(PY) -m pytest -q -m "not slow and not gpu" $(ARGS)

test-full: setup ## every test, slow ones included
	$(PY) -m pytest -q $(ARGS)

lint: setup ## ruff
	$(VENV)/bin/ruff check src tests benchmarks

format: setup ## ruff format + fixes
	$(VENV)/bin/ruff check --fix src tests benchmarks && $(VENV)/bin/ruff format src tests benchmarks

bench: setup ## throughput of one stage-1 step (CPU: tiny grid, <1 min; on a GPU: small/base/large x 1k/4k/32k). ARGS="--out DIR --threads 1 ..."
	$(PY) -m benchmarks.train_step $(ARGS)

bench-data: setup ## data-loader throughput (pairs/s per core) on the sample and a generated 1M-pair sharded set
	$(PY) -m benchmarks.data_loader $(ARGS)

bench-encode: setup ## corpus encoding (passages/s, tokens/s) of me5 vs SentenceTransformer.encode, MIRACL-en projection (CPU ~3 min)
	$(PY) -m benchmarks.encode $(ARGS)

bench-mine: setup ## hard-negative mining (queries/s, passages/s; exact, HNSW, IVF) and teacher scoring (pairs/s) vs sentence-transformers (CPU <1 min). ARGS="--model small --queries 20000 ..."
	$(PY) -m benchmarks.mining $(ARGS)

sweep-example: setup ## a 3-run temperature sweep on the sample data (multirun, one W&B group)
	$(PY) -m me5.train -m loss.temperature=0.01,0.02,0.05 $(ARGS)

report: setup ## report.md + loss PNG of a run, or one table across a sweep; ARGS="[DIR] [--wandb]" (default: newest under $ME5_LOG_DIR, else outputs/)
	$(PY) -m me5.app.report $(ARGS)

$(VENV)/.notebook: $(VENV)/.installed
	$(PIP) install -q -c constraints.txt -e ".[notebook]" 2>&1 | { grep -v "is ignored" || true; }
	touch $@

# the kernel runs in notebooks/: a folder given relative to here is made absolute first
notebook: $(VENV)/.notebook ## execute notebooks/run_report.ipynb into $TMPDIR (outputs not committed); ARGS="[DIR]" (default: newest under $ME5_LOG_DIR, else outputs/)
	ME5_REPORT_DIR="$(if $(strip $(ARGS)),$(abspath $(strip $(ARGS))))" $(if $(ME5_LOG_DIR),ME5_LOG_DIR="$(abspath $(ME5_LOG_DIR))") \
	  $(PY) -m nbconvert --to notebook --execute notebooks/run_report.ipynb --output-dir $${TMPDIR:-/tmp} --output run_report.ipynb

clean: ## remove generated data, runs and caches (keeps .venv)
	rm -rf data/sample outputs multirun .pytest_cache
