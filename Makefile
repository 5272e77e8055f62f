# Two commands: `make demo` and `make test`. Everything else is a convenience.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

ROOT := $(CURDIR)
VENV := $(ROOT)/.venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
comma := ,
PIP_QUIET := { grep -v "is ignored: it is neither a file nor a directory" || true; }

# The embedded default: every piece of state under .local/
export PIPELINE_HOME ?= $(ROOT)/.local
export AIRFLOW_HOME ?= $(ROOT)/.local/airflow
export AIRFLOW__CORE__DAGS_FOLDER ?= $(ROOT)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER ?= $(ROOT)/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES ?= False
export AIRFLOW__CORE__PARALLELISM ?= 4
export AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG ?= 4
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN ?= sqlite:///$(ROOT)/.local/airflow/airflow.db
export AIRFLOW__API__HOST ?= 127.0.0.1
export AIRFLOW__API__PORT ?= 8080
export AIRFLOW__LOGGING__LOGGING_LEVEL ?= INFO
export AIRFLOW__SCHEDULER__STANDALONE_DAG_PROCESSOR ?= True
# a worker is freed within 1 s of its task's end, not 5 (plugins/pipeline_executor.py)
export AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL ?= 1
export MLFLOW_HTTP_REQUEST_MAX_RETRIES ?= 2
export MLFLOW_HTTP_REQUEST_TIMEOUT ?= 30
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION ?= false
export PYTHONUNBUFFERED := 1

.PHONY: help install demo test test-unit test-dags test-integration test-stack test-browser bench lint typecheck airflow mlflow stop lock clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

# The dev environment: production pins (requirements.txt, what the images install) plus the
# test and tooling pins (requirements-dev.txt: pytest, moto, ruff, mypy, pre-commit).
$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt -c constraints.txt 2>&1 | $(PIP_QUIET)
	$(PY) -m pip install -q --no-deps -e . 2>&1 | $(PIP_QUIET)
	$(PY) -c "import airflow, mlflow, torch, evidently, great_expectations, pipeline"
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the pinned, locked dev environment (requirements-dev.txt)

demo: $(STAMP)  ## run both example models' DAGs for real on the embedded default (7 runs)
	$(PY) scripts/demo.py

# The test lanes: one folder each under tests/ (marker = folder name), the browser tests
# marked `browser`. `make test` runs every lane at once under pytest-xdist: the stack on a
# worker of its own, started first, its Celery and human-path modules next, each in a
# process with its own servers, the rest shared (tests/conftest.py: groups, order). TEST_WORKERS=1 runs it in one process, in file order.
TEST_WORKERS ?= 4
PYTEST := $(PY) -m pytest -q

test: $(STAMP)  ## the whole suite, every lane at once (TEST_WORKERS=4 pytest-xdist workers)
	$(PYTEST) --durations=15 $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadgroup)

test-unit: $(STAMP)  ## lane: unit tests (embedded state, no servers)
	$(PYTEST) tests/unit

test-dags: $(STAMP)  ## lane: DAG integrity tests
	$(PYTEST) tests/dags

test-integration: $(STAMP)  ## lane: whole DAG runs, serving, S3 on the embedded default (not the browser)
	$(PYTEST) tests/integration -m "not browser"

test-stack: $(STAMP)  ## lane: real PostgreSQL, moto S3, MLflow (basic-auth) and Airflow servers
	$(PYTEST) tests/stack

test-browser: $(STAMP)  ## lane: headless Chromium through the Airflow and MLflow UIs
	$(PYTEST) tests/integration -m browser

# Each benchmark's output goes to $(BENCH_OUT)/<name>.out (its exit code to <name>.rc); the
# run ends with one table of every target (benchmarks/_table.py). A missed target is reported
# there; make bench fails only when a benchmark could not run. BENCH=name1,name2 runs a subset.
BENCH_OUT ?= $(PIPELINE_HOME)/bench
BENCH ?= $(patsubst benchmarks/%.py,%,$(wildcard benchmarks/[a-z]*.py))
bench: $(STAMP)  ## benchmarks (ratios against a baseline in the same run), then one table of targets
	rm -rf $(BENCH_OUT) && mkdir -p $(BENCH_OUT)
	for b in $(subst $(comma), ,$(BENCH)); do echo "== benchmarks.$$b"; \
	  rc=0; $(PY) -m benchmarks.$$b 2>&1 | tee $(BENCH_OUT)/$$b.out || rc=$$?; \
	  echo $$rc > $(BENCH_OUT)/$$b.rc; done
	$(PY) -m benchmarks._table $(BENCH_OUT)

LINT_PATHS := pipeline dags plugins tests scripts benchmarks models

lint: $(STAMP)  ## ruff check and ruff format --check
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

typecheck: $(STAMP)  ## mypy on pipeline/, dags/ and plugins/ (files set in pyproject.toml)
	$(VENV)/bin/mypy

airflow: $(STAMP)  ## Airflow UI on http://127.0.0.1:8080 (airflow standalone; Ctrl-C stops it and its children)
	$(PY) scripts/airflow_standalone.py

mlflow: $(STAMP)  ## MLflow UI on http://127.0.0.1:5000 over the embedded store
	mkdir -p .local/mlflow
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(ROOT)/.local/mlflow/mlflow.db \
	  --default-artifact-root $(ROOT)/.local/mlflow/artifacts --host 127.0.0.1 --port 5000 --workers 1

lock:  ## regenerate constraints.txt from the current .venv
	( echo "# Full lock of transitive versions (pip constraints). Regenerate: make lock"; \
	  $(PY) -m pip freeze --exclude-editable | sed 's/+cpu$$//' ) > constraints.txt

clean:  ## remove all embedded state (.local/); keeps .venv
	rm -rf .local
