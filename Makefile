# The two README commands are `make demo` and `make test`; both create .venv and install into it.
# torch is pinned to the CPU wheel that lies on disk, so set-up takes seconds instead of a CUDA download;
# the demo installs only what it needs, the tests add triton (interpreter tests) and transformers.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
PIP     = $(BIN)/pip install -q --disable-pip-version-check
TORCH  ?= torch==2.13.0

.PHONY: demo test check bench lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	$(PIP) "$(TORCH)" -e ".[demo]"
	touch $@

$(VENV)/.bench-installed: pyproject.toml | $(BIN)/python
	$(PIP) "$(TORCH)" -e ".[bench]"
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(PIP) "$(TORCH)" -e ".[dev,demo,triton,hf,rl]"
	touch $@

demo: $(VENV)/.demo-installed
	$(BIN)/xentlib train

test: $(VENV)/.test-installed
	$(BIN)/python -m pytest -q

check: $(VENV)/.test-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -m "not slow"

# BENCH_ARGS picks the run, e.g. make bench BENCH_ARGS="--preset tiny" or "--device cuda --preset gpu-large".
bench: $(VENV)/.bench-installed
	$(BIN)/xentlib bench $(BENCH_ARGS)

lint: $(VENV)/.test-installed
	$(BIN)/ruff check .

format: $(VENV)/.test-installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache .hypothesis
