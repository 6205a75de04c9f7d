# Two commands for a fresh machine: `make example` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
# torch is installed first, on its own: on CPU-only machines 2.13.0 is the CPU build; set TORCH=torch
# (or a CUDA wheel spec) to pick another.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: example test lint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q "$(TORCH)"
	$(VENV)/bin/python -m pip install -q -e ".[test]"
	touch $@

example: $(VENV)/.installed
	$(VENV)/bin/python examples/qlora_finetune.py

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check bnb_lightning tests examples benchmarks
	$(VENV)/bin/ruff format --check bnb_lightning tests examples benchmarks
