# MedSAM2 — `make demo` runs the main job, `make test` runs the tests. Both set up .venv themselves.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-all up down bench lint clean

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY)"; exit 1; }
	@test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip setuptools wheel
	$(VENV)/bin/pip install -q -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	./scripts/demo.sh

up: setup
	./scripts/up.sh

down:
	./scripts/down.sh

# MEDSAM2_REQUIRE_DATA=1: missing sample data or Postgres fails the test (with how to get it) instead of skipping
test: setup
	source scripts/env.sh && MEDSAM2_REQUIRE_DATA=$${MEDSAM2_REQUIRE_DATA:-1} $(VENV)/bin/python -m pytest -m "not gpu" $(PYTEST_ARGS)

test-all: setup
	source scripts/env.sh && $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/python benchmarks/train_throughput.py --quick

lint: setup
	$(VENV)/bin/ruff check medsam2 flows tuning tests benchmarks

clean: down
	rm -rf .medsam2
