# One command sets up and runs the tests: `make test` (creates .venv, installs torch==2.13.0 first, then
# ldmkit with its test extras, then runs ruff and pytest).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: test lint setup clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

lint: $(VENV)/.installed
	$(PY) -m ruff check src tests benchmarks

test: lint
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
