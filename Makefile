# One-command set-up: `make test` and `make demo` create .venv, install torch and the package with its
# extras once (a stamp file remembers), then run. Re-running installs nothing new.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.aekt-installed
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: setup test quick demo bench check dist clean

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.cfg pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

quick: $(STAMP)
	$(PY) -m pytest -m "not slow"

demo: $(STAMP)
	$(VENV)/bin/aekt demo

bench: $(STAMP)
	$(VENV)/bin/aekt bench

check: $(STAMP)
	$(VENV)/bin/aekt check

dist: $(STAMP)
	rm -rf dist
	$(PY) -m build --outdir dist .
	$(PY) -m twine check --strict dist/*

clean:
	rm -rf build dist *.egg-info .pytest_cache
