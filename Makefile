# One command makes an image on a fresh machine, offline, with the bundled emoji models: `make demo`
# (creates .venv, installs torch==2.13.0 first, then ldmkit, then runs `ldmkit txt2img`).
# One command sets up and runs the tests: `make test` (the same .venv, plus the test extras; ruff, pytest).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

PROMPT ?= red apple
SEED ?= 0

.PHONY: demo test lint setup clean-venv

# Core install only (what a user needs to generate); the test extras come with `make test`.
$(VENV)/.core-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	touch $@

demo: $(VENV)/.core-installed
	HF_HUB_OFFLINE=1 $(VENV)/bin/ldmkit txt2img "$(PROMPT)" --seed $(SEED) --n 4 --grid --upscale -o outputs/demo

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
