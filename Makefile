# Two entry points for a new machine: `make run` and `make test` (both install first).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Embedded defaults, all inside this folder: Prefect's local API keeps its state here,
# MLflow uses ./mlflow.db + ./mlruns (its own default), DVC pushes to ./.dvc-remote.
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup run test test-fast repro ui bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/.installed

run: setup                      ## the full pipeline on ELPV as a Prefect flow
	tlops run

test: setup                     ## the whole test suite (what CI runs)
	pytest

test-fast: setup                ## unit tests only
	pytest -m "not slow"

repro: setup                    ## the same pipeline through DVC
	dvc repro

ui: setup                       ## the MLflow UI on the local store
	mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000

bench: setup                    ## feature-extraction and cache benchmarks (figures in README)
	python benchmarks/feature_extraction.py

clean:                          ## remove run outputs and caches (not the venv, not the DVC remote)
	rm -rf outputs .cache .prefect mlruns mlflow.db
