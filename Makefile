# Set-up and the two entry points. Everything lives in .venv at the repo root.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# pytest workers (pytest-xdist): much of the suite is single-threaded XLA compilation; 0 runs it in one process
WORKERS ?= 2

.PHONY: install install-test test demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

test: install-test
	$(BIN)/python -m pytest -n $(WORKERS) $(PYTEST_ARGS)

demo: install
	$(BIN)/glmv demo

clean:
	rm -rf $(VENV) .pytest_cache
