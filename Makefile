# Everything runs from .venv, built here from pinned versions (constraints.txt).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: run test lint format check bench-tokens bench-gateway clean

run: $(VENV)/.runtime
	$(BIN)/tokengate run

test: $(VENV)/.test
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: $(VENV)/.test
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: $(VENV)/.test
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

check: $(VENV)/.runtime
	$(BIN)/tokengate check

bench-tokens: $(VENV)/.bench
	$(BIN)/python bench/token_issuance.py

bench-gateway: $(VENV)/.bench
	$(BIN)/python bench/gateway_overhead.py

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime: $(VENV)/bin/python pyproject.toml constraints.txt
	$(PIP) install -c constraints.txt -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(PIP) install -c constraints.txt -e '.[test]'
	touch $@

$(VENV)/.bench: $(VENV)/.test
	$(PIP) install -c constraints.txt -e '.[test,bench]'
	touch $@

clean:
	rm -rf $(VENV) data .pytest_cache .ruff_cache
