# The README's two commands: `make quickstart` and `make test`. Each sets up .venv on first use.
VENV ?= .venv
PYTHON ?= python3
# torch first, pinned, so the rest cannot pull another build. Where pip would otherwise fetch the
# CUDA wheel from PyPI: make test TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu";
# on a GPU machine: make test TORCH=torch
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=
BIN := $(VENV)/bin

.PHONY: quickstart test lint setup clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)" $(TORCH_PIP_ARGS)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

quickstart: $(BIN)/.installed
	$(BIN)/rlcpm quickstart

lint: $(BIN)/.installed
	$(BIN)/ruff check rlcpm tests benchmarks

test: lint
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
