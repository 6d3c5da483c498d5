# Two commands on a fresh machine:  `make run` (the whole pipeline on the embedded
# synthetic cohort) and `make test` (the test suite). Both create .venv/ first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DVC_NO_ANALYTICS := 1
export MPLBACKEND := Agg

.PHONY: venv run test test-fast lock clean

venv: $(STAMP)

# torch first and exactly 2.13.0 (a CPU build is on local disk; anything looser pulls a
# multi-GB CUDA build), then the lock file under a constraint that keeps that torch.
$(STAMP): requirements.lock constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -m pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -m pip install -q -r requirements.lock -c constraints.txt 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -m pip install -q --no-deps -e . 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import torch, monai, mlflow, deepsc; assert torch.__version__.startswith('2.13.0')"
	touch $(STAMP)

# The main job: regenerate the cohort that data.dvc pins (or keep the one present),
# then every DVC stage from validation to registry promotion.
run: $(STAMP)
	$(BIN)/deepsc synth
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc metrics show

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest

test-fast: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m "not slow"

# Regenerate requirements.lock after changing dependencies in pyproject.toml.
lock: $(STAMP)
	$(BIN)/python -m pip freeze --exclude-editable | sed 's/^torch==2.13.0+cpu/torch==2.13.0/' > requirements.lock

clean:
	rm -rf outputs mlflow.db mlartifacts .kfp_local
