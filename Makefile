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
	$(BIN)/ruff check fusion privacy schemas pipelines tests bench
	$(BIN)/mypy

unit: setup
	$(BIN)/pytest -q -m "not e2e"

test: setup lint
	$(BIN)/pytest -q

# Benchmarks: N readings (default 10M); bench-only deps (PipelineDP) go to bench/.deps, not the main venv.
N ?= 10000000
BENCH_DEPS := bench/.deps/.installed

$(BENCH_DEPS): bench/requirements.lock $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps --upgrade --target bench/.deps -r bench/requirements.lock
	@touch $(BENCH_DEPS)

bench: setup $(BENCH_DEPS)
	$(BIN)/python -m bench.run --rows $(N) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) demo bench/.deps bench/out .pytest_cache .mypy_cache .ruff_cache
