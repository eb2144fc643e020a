# Fusion: `make demo` and `make test` set everything up (idempotently) and run.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
SHELL  := /bin/bash
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint unit bench bench-forecast clean docs browser

setup: $(STAMP)

# First run on a fresh machine: about 3-4 minutes (some 150 wheels, ~1.2 GB installed, torch CPU the largest);
# later runs find $(STAMP) newer than the lock and do nothing.
$(STAMP): requirements.lock pyproject.toml
	@echo "==> Setting up $(VENV) from requirements.lock (first run: about 3-4 minutes; later runs: nothing to do)"
	@echo "==> [1/4] virtual environment"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "==> [2/4] pip itself"
	@$(BIN)/python -m pip install --quiet --upgrade pip
	@echo "==> [3/4] pinned dependencies: one line per package"
	@$(BIN)/python -m pip install --progress-bar on -r requirements.lock 2>&1 \
		| grep --line-buffered -E '^(Collecting|Requirement already|Installing collected|Successfully|ERROR|error)' \
		| sed -u -e 's/^/    /' -e 's/^    Successfully installed.*/    installed./'; \
		test $${PIPESTATUS[0]} -eq 0
	@echo "==> [4/4] Fusion itself (editable)"
	@$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e . >$(VENV)/install.log 2>&1 \
		|| { cat $(VENV)/install.log; exit 1; }
	@touch $(STAMP)
	@echo "==> Set-up done."

demo: setup
	$(BIN)/fusion demo --dir demo

lint: setup
	$(BIN)/ruff check fusion privacy schemas pipelines forecasting mechanisms dashboard training tests bench
	$(BIN)/mypy

# The tests run on two workers (pytest-xdist: 1.8 min for `make unit`, 3.0 min in one process, on 2 quiet cores);
# PYTEST_WORKERS=0 runs them in this process (pdb, -x).
PYTEST_WORKERS ?= 2

unit: setup
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) -m "not e2e"

# Debian's chromium for the dashboard's browser tests, installed when absent (root or sudo); without it they skip.
browser:
	@bash .ci/ensure-chromium || echo "==> no chromium: the dashboard's browser tests will be skipped (apt-get install chromium)"

test: setup lint browser
	$(BIN)/pytest -q -n $(PYTEST_WORKERS)

# The documentation site: reference pages generated from the code, then MkDocs (strict: a broken link fails) into site/.
docs: setup
	$(BIN)/python docs/gen_reference.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# Benchmarks: N readings (default 10M); bench-only deps (PipelineDP) go to bench/.deps, not the main venv.
# SCALING: the sizes of the scaling table (1 and 2 workers each; SCALING= skips it).
N ?= 10000000
SCALING ?= 1000000,10000000,30000000
# MASKING: the federation sizes of the many-institutions benchmark (bench/scale.py; MASKING= skips it).
MASKING ?= 5,20,100,500
BENCH_DEPS := bench/.deps/.installed

$(BENCH_DEPS): bench/requirements.lock $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps --upgrade --target bench/.deps -r bench/requirements.lock
	@touch $(BENCH_DEPS)

bench: setup $(BENCH_DEPS)
	$(BIN)/python -m bench.run --rows $(N) --scaling=$(SCALING) --masking-scale=$(MASKING) $(BENCH_ARGS)

# Forecasting accuracy (issue 19's targets): observed weather, then climate normals (vega_datasets, in bench/.deps).
bench-forecast: setup $(BENCH_DEPS)
	$(BIN)/python -m bench.forecast $(BENCH_ARGS)

clean:
	rm -rf $(VENV) demo site bench/.deps bench/out .pytest_cache .mypy_cache .ruff_cache
