# Two commands for a fresh machine: `make example` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
# torch is installed first, on its own: on CPU-only machines 2.13.0 is the CPU build; set TORCH=torch
# (or a CUDA wheel spec) to pick another.
TORCH ?= torch==2.13.0
DEEPSPEED ?= deepspeed==0.19.8
PYTEST_ARGS ?=

.PHONY: example test lint deepspeed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q "$(TORCH)"
	$(VENV)/bin/python -m pip install -q -e ".[test]"
	touch $@

# DeepSpeed, for one test only (the test of its refusal, skipped without it): a source package,
# built against the torch above (build isolation would fetch another torch) and without its
# compiled ops. CI installs it before the tests; `make test` does not need it.
$(VENV)/.deepspeed: $(VENV)/.installed
	DS_BUILD_OPS=0 $(VENV)/bin/python -m pip install -q --no-build-isolation "$(DEEPSPEED)"
	touch $@

deepspeed: $(VENV)/.deepspeed

example: $(VENV)/.installed
	$(VENV)/bin/python examples/qlora_finetune.py

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check bnb_lightning tests examples benchmarks
	$(VENV)/bin/ruff format --check bnb_lightning tests examples benchmarks
