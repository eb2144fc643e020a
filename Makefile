# Fusion: `make demo` and `make test` set everything up (idempotently) and run.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint unit bench clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

demo: setup
	$(BIN)/fusion demo --dir demo

lint: setup
	$(BIN)/ruff check fusion privacy schemas pipelines tests
	$(BIN)/mypy

unit: setup
	$(BIN)/pytest -q -m "not e2e"

test: setup lint
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) demo .pytest_cache .mypy_cache .ruff_cache
