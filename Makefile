# The two commands of the README:
#   make run    set up .venv, build the embedded benchmark, run the continual loop once
#   make test   set up .venv (and PostgreSQL for the team tests), run the test suite
# ORT=gpu selects onnxruntime-gpu instead of onnxruntime (never both in one environment).

PYTHON ?= python3.11
VENV   ?= .venv
ORT    ?= cpu
BIN    := $(VENV)/bin

.PHONY: setup lock postgresql run test demo-data schedule repro mlflow-ui clean-run

setup: $(VENV)/.installed

# requirements.lock pins every resolved version (pip constraints), so each fresh machine gets the same packages
$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -c requirements.lock -e '.[$(ORT),dev]'
	touch $@

# re-resolve requirements.lock from pyproject.toml in a scratch venv (then review the diff and commit it)
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade pip
	.venv-lock/bin/python -m pip install --quiet -e '.[cpu,dev]'
	{ sed -n '1,2p' requirements.lock; echo "# Resolved on $$(uname -sm), Python 3.11, $$(date +%F)."; .venv-lock/bin/pip freeze --exclude-editable; \
	  grep '^onnxruntime-gpu' requirements.lock; } > requirements.lock.new && mv requirements.lock.new requirements.lock
	rm -rf .venv-lock

# the embedded benchmark, built once (delete data/generators to rebuild it)
demo-data: setup
	@if [ -d data/generators ]; then echo "data/generators exists: keeping it"; \
	else $(BIN)/r2m demo-data --out data/generators; fi

run: demo-data
	$(BIN)/r2m run

# a local Prefect server + the watcher deployment on the schedule of params.yaml (UI: http://127.0.0.1:4200)
schedule: setup
	$(BIN)/python -m flows.serve

# the same stages as a DVC pipeline (needs the embedded benchmark or your data under data/generators)
repro: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# browse runs, tables, plots and the registry (UI: http://127.0.0.1:5000)
mlflow-ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --default-artifact-root ./mlartifacts

# the team tests start a real PostgreSQL of their own (tests/servers.py): Debian's `postgresql`
# package, installed here when its initdb is missing (as root; otherwise say what to install)
postgresql:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 \
	   || [ -n "$$R2M_PG_BINDIR" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing PostgreSQL (Debian's postgresql package) for the team tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	else echo "PostgreSQL's initdb not found: install the postgresql package (or set R2M_PG_BINDIR)" >&2; exit 1; fi

test: setup postgresql
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest

clean-run:
	rm -rf artifacts mlruns mlflow.db mlartifacts reports dvc_plots .prefect deploy/model_repository/r2m_detector
