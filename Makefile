# Stamen: the two commands of the README, plus helpers. Needs only python3 on the machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
FLWR_VENV := .venv-flwr
FLWR_VERSION := 1.12.0

.PHONY: demo test lint typecheck pytest proto interop-venv bench bench-simulation clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[demo,plot]'
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

# Real Flower (with its REST extra), only as a test peer, in a virtualenv of its own (never a
# Stamen dependency).
$(FLWR_VENV)/.installed:
	$(PYTHON) -m venv $(FLWR_VENV)
	$(FLWR_VENV)/bin/python -m pip install -q --upgrade pip
	$(FLWR_VENV)/bin/python -m pip install -q 'flwr[rest]==$(FLWR_VERSION)'
	touch $@

interop-venv: $(FLWR_VENV)/.installed

# Stamen against Flower 1.12 on the same workloads (bench/README.md): results in
# bench/results/flower_vs_stamen.json and the tables in bench/README.md. 6-10 minutes.
bench: $(VENV)/.dev-installed $(FLWR_VENV)/.installed
	$(BIN)/python bench/flower_vs_stamen/run.py --flower-python $(CURDIR)/$(FLWR_VENV)/bin/python --readme

# Flower with its Ray simulation extra, for bench/simulation only.
FLWR_SIM_VENV := .venv-flwr-sim
$(FLWR_SIM_VENV)/.installed:
	$(PYTHON) -m venv $(FLWR_SIM_VENV)
	$(FLWR_SIM_VENV)/bin/python -m pip install -q --upgrade pip
	$(FLWR_SIM_VENV)/bin/python -m pip install -q 'flwr[simulation]==$(FLWR_VERSION)'
	touch $@

bench-simulation: $(VENV)/.dev-installed $(FLWR_SIM_VENV)/.installed
	STAMEN_FLWR_SIM_PYTHON=$(CURDIR)/$(FLWR_SIM_VENV)/bin/python $(BIN)/python bench/simulation/run.py --repeat 3

demo: $(VENV)/.demo-installed
	$(BIN)/stamen demo

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check src tests scripts bench
	$(BIN)/ruff format --check src tests scripts bench

typecheck: $(VENV)/.dev-installed
	$(BIN)/mypy

pytest: $(VENV)/.dev-installed $(FLWR_VENV)/.installed
	STAMEN_FLWR_PYTHON=$(CURDIR)/$(FLWR_VENV)/bin/python $(BIN)/pytest

test: lint typecheck pytest

proto: $(VENV)/.dev-installed
	$(BIN)/python scripts/gen_proto.py

clean:
	rm -rf $(VENV) $(FLWR_VENV) .pytest_cache .mypy_cache .ruff_cache
