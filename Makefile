# Stamen: the two commands of the README, plus helpers. Needs only python3 on the machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
FLWR_VENV := .venv-flwr
FLWR_VERSION := 1.12.0

.PHONY: demo test lint typecheck pytest docs docs-serve proto interop-venv bench bench-simulation clean browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[demo,plot]'
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

$(VENV)/.docs-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[docs]'
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
# bench/results/flower_vs_stamen.json and the tables in bench/README.md. 15-20 minutes.
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
	$(BIN)/ruff check src tests scripts bench examples
	$(BIN)/ruff format --check src tests scripts bench examples

typecheck: $(VENV)/.dev-installed
	$(BIN)/mypy

# Headless Chromium and its WebDriver for the dashboard's browser test
# (tests/integration/test_dashboard_browser.py): installed with apt when missing and we are
# root (a fresh Debian CI machine); otherwise that test is skipped and says why.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium and chromium-driver for the dashboard's browser test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			chromium chromium-driver >/dev/null || \
		echo "could not install chromium: the dashboard's browser test will be skipped"; \
	else \
		echo "chromium/chromedriver missing and not root: the dashboard's browser test will be skipped"; \
	fi

pytest: $(VENV)/.dev-installed $(FLWR_VENV)/.installed browser
	STAMEN_FLWR_PYTHON=$(CURDIR)/$(FLWR_VENV)/bin/python $(BIN)/pytest

# The documentation site (mkdocs.yml, docs/) into site/. --strict: a broken link, a missing
# page or an API reference that does not resolve fails the build.
MKDOCS := NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs

docs: $(VENV)/.docs-installed
	$(MKDOCS) build --strict

# Serve the site at http://127.0.0.1:8000, rebuilt on every change.
docs-serve: $(VENV)/.docs-installed
	$(MKDOCS) serve --strict

test: lint typecheck docs pytest

proto: $(VENV)/.dev-installed
	$(BIN)/python scripts/gen_proto.py

clean:
	rm -rf $(VENV) $(FLWR_VENV) .pytest_cache .mypy_cache .ruff_cache site
