# The two commands of the README:
#   make run    set up .venv, build the embedded benchmark, run the continual loop once
#   make test   set up .venv, run the test suite
# ORT=gpu selects onnxruntime-gpu instead of onnxruntime (never both in one environment).

PYTHON ?= python3.11
VENV   ?= .venv
ORT    ?= cpu
BIN    := $(VENV)/bin

.PHONY: setup run test demo-data clean-run

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -e '.[$(ORT),dev]'
	touch $@

demo-data: setup
	$(BIN)/r2m demo-data --out data/generators

run: demo-data
	$(BIN)/r2m run

test: setup
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest

clean-run:
	rm -rf artifacts mlruns mlflow.db mlartifacts reports deploy/model_repository/r2m_detector
