# Every target does its own set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/drift demo --nodes 2

lint: $(STAMP)
	$(BIN)/ruff check lightning_drift cli tests benchmarks examples
	$(BIN)/ruff format --check lightning_drift cli
	$(BIN)/mypy lightning_drift

bench: $(STAMP)
	$(BIN)/python benchmarks/transfer.py
	$(BIN)/python benchmarks/barrier.py
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/convergence.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
