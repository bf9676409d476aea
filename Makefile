# Quick start:  make train   (set up .venv, train the default config, print test AUC)
#               make test    (set up .venv, run the linter and the whole test suite)

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKDIR ?= workdirs/criteo_dlrm
CONFIG ?= configs/criteo_dlrm.py

.PHONY: setup train test lint benchmarks compare clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/python experiments/train.py --config=$(CONFIG) --workdir=$(WORKDIR)

lint: $(STAMP)
	$(BIN)/ruff check persia_jax experiments configs tests

test: $(STAMP) lint
	$(BIN)/python -m pytest -q tests

compare: $(STAMP)
	$(BIN)/python experiments/compare_modes.py --variants=sync,hybrid,async,replay
	$(BIN)/python experiments/compare_modes.py --variants=hybrid,hybrid_bf16,hybrid_fp16_wire --name=precision
	$(BIN)/python experiments/compare_modes.py --config=configs/criteo_lr.py --variants=sync --name=logistic

benchmarks: $(STAMP)
	$(BIN)/python experiments/benchmark_embedding.py
	$(BIN)/python experiments/benchmark_data.py
	$(BIN)/python experiments/benchmark_dense.py

clean:
	rm -rf $(VENV) .pytest_cache
