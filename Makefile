# The two README commands are `make demo` and `make test`; both create .venv and install into it.
# torch is pinned to the CPU wheel that lies on disk, so set-up takes seconds instead of a CUDA download.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
TORCH  ?= torch==2.13.0
EXTRAS ?= dev,demo,triton,hf

.PHONY: install demo test check bench lint format clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH)" -e ".[$(EXTRAS)]"
	touch $@

demo: install
	$(BIN)/xentlib train

test: install
	$(BIN)/python -m pytest -q

check: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/xentlib bench

lint: install
	$(BIN)/ruff check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache .hypothesis
