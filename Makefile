# MailSender — the two commands of the README, and the tools behind them.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test lint typecheck unit integration bench bench-deps bench-memory chaos install services clean

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

## The crash test, longer: kills, a Redis restart, 10% 421 replies (CHAOS_ARGS="--events 1000").
chaos: install services
	$(PY) bench/chaos $(CHAOS_ARGS)

## Postfix's smtp-sink and smtp-source for `make bench` (Debian package postfix), installed
## without starting the MTA: "No configuration" preseeded, service starts refused by policy-rc.d.
bench-deps: services
	@command -v smtp-sink >/dev/null 2>&1 || [ -x /usr/sbin/smtp-sink ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing postfix for smtp-sink and smtp-source (the MTA is not started)"; \
	    if command -v debconf-set-selections >/dev/null 2>&1; then \
	      echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
	    fi; \
	    policy=/usr/sbin/policy-rc.d; added=; \
	    if [ ! -e $$policy ]; then printf '#!/bin/sh\nexit 101\n' > $$policy; chmod +x $$policy; added=1; fi; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix) >/dev/null; \
	    status=$$?; \
	    [ -z "$$added" ] || rm -f $$policy; \
	    if pgrep -f '[p]ostfix/master' >/dev/null; then postfix stop >/dev/null 2>&1 || true; fi; \
	    exit $$status; \
	  else \
	    echo "smtp-sink is missing: install Debian's postfix package (and do not start it)"; exit 1; \
	  fi; }

## The benchmark of issue 4: one table, both scenarios (BENCH_ARGS="--quick", "--runs 5" ...).
bench: install bench-deps
	$(PY) -m bench.run $(BENCH_ARGS)

## Worker memory: one 25 MB attachment (by reference and inline), and RSS over a long run.
bench-memory: install bench-deps
	$(PY) -m bench.memory $(BENCH_ARGS)

clean:
	rm -rf $(VENV) demo-outbox .mypy_cache .ruff_cache .pytest_cache
