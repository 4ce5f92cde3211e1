# Two entry points, each doing all set-up on a fresh machine:
#   make demo   -- audit the magnetic-tile test split end to end on the embedded default
#   make test   -- lint, type-check and run the test suite against real Redis, PostgreSQL, RabbitMQ
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint install services

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned exactly: pip takes these from the machine's disk; a looser pin downloads GBs.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

services:
	bash scripts/ensure-services.sh

demo: install
	$(BIN)/inspection-audit demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: install services
	bash scripts/ensure-tools.sh
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q
