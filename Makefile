# The two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_LOGGING_LEVEL ?= INFO

.PHONY: demo test venv bench clean server

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || { command -v $(PYTHON) >/dev/null && $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m flows.cli demo

test: $(STAMP)
	$(PY) -m pytest -q

# A local Prefect server with its UI (runs, task states, report artifacts, deployments, automations).
# In another shell: export PREFECT_API_URL=http://127.0.0.1:4200/api, then `.venv/bin/porcelain serve run.yaml`.
server: $(STAMP)
	@echo "Prefect UI: http://127.0.0.1:4200  (PREFECT_HOME=$(PREFECT_HOME); point others at PREFECT_API_URL=http://127.0.0.1:4200/api)"
	$(VENV)/bin/prefect server start --host 127.0.0.1 --port 4200

bench: $(STAMP)
	$(PY) benchmarks/demo_timing.py

clean:
	rm -rf porcelain-runs .prefect .pytest_cache
