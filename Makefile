# calcsvc: `make demo` runs the outage demo, `make test` runs every check,
# `make bench` measures what the breaker and the metrics cost, `make soak`
# holds a server and its clients under load for ten minutes. Each sets up
# everything it needs first, on a machine with Python 3.11+.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: setup demo test lint typecheck pytest soak bench protos prometheus redis bench-fleet clean

setup: $(INSTALLED) prometheus redis

# The monitoring tests run a real Prometheus and its promtool.
prometheus:
	@tests/install-debian-package.sh prometheus prometheus promtool

# The fleet tests run a real Redis, which holds a breaker shared by processes.
redis:
	@tests/install-debian-package.sh redis-server redis-server

$(INSTALLED): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "calcsvc needs Python 3.11 or newer: run make PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(INSTALLED)
	$(BIN)/calcsvc demo

test: lint typecheck pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

pytest: setup
	$(BIN)/pytest

# Ten minutes of load; CALCSVC_SOAK_SECONDS=60 make soak for a quick look.
soak: $(INSTALLED)
	$(BIN)/pytest -m soak -n 0 -s tests/test_load.py

# Prints the table and rewrites docs/benchmarks.md; takes a few minutes.
bench: $(INSTALLED) bench-fleet
	$(BIN)/python bench/run.py

# A fleet of client processes against a server that dies, with and without a
# breaker shared in Redis; writes its own section of docs/benchmarks.md.
bench-fleet: $(INSTALLED) redis
	$(BIN)/python bench/fleet.py

# Regenerate calcsvc/_generated after editing protos/.
protos: setup
	$(BIN)/python protos/generate.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache *.egg-info
