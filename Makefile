# MailSender — the two commands of the README, and the tools behind them.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test lint typecheck unit integration bench chaos install services clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "MailSender needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

install: $(STAMP)

## Installs what the tests need from Debian (redis-server) when it is missing and we may.
services:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing redis-server"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) >/dev/null; \
	  else \
	    echo "redis-server is missing: install it (apt-get install redis-server)"; exit 1; \
	  fi; }

demo: install
	$(VENV)/bin/mailsender demo

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy

test: install services lint typecheck
	$(PY) -m pytest

unit: install
	$(PY) -m pytest tests/unit

integration: install services
	$(PY) -m pytest tests/integration

clean:
	rm -rf $(VENV) demo-outbox .mypy_cache .ruff_cache .pytest_cache
