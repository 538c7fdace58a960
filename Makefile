# Two commands on a new machine: `make demo` and `make test`. Each installs what it needs.
#
# The virtual environment lives outside the work tree (torch alone is ~5.5 GB) and is shared by
# every clone on this machine. It is synced only when a requirements file changes (the stamp's
# name is their hash), Horovod is compiled once per environment, and this checkout is
# installed in editable mode whenever the environment last pointed at another checkout.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= $(HOME)/.cache/retrain/venv-py311
BIN := $(VENV)/bin
REQS := requirements.txt training/requirements.txt requirements-dev.txt
REQS_HASH := $(shell cat $(REQS) | sha256sum | cut -c1-16)
TREE_HASH := $(shell echo "$(CURDIR)" | sha256sum | cut -c1-16)
STAMP := $(VENV)/.requirements-$(REQS_HASH)
HOROVOD_STAMP := $(VENV)/.horovod-0.28.1
# checkov scans infra/ offline; it lives in a venv of its own (its pins are not the worker's).
CHECKOV_VENV ?= $(HOME)/.cache/retrain/checkov-$(shell sha256sum requirements-checkov.txt | cut -c1-16)
CHECKOV := $(CHECKOV_VENV)/bin/checkov
EDITABLE_STAMP := $(VENV)/.editable-$(TREE_HASH)

.PHONY: venv horovod azurite chromium checkov demo test unit lint format bench mutate clean-venv

venv: $(STAMP) $(EDITABLE_STAMP)

$(STAMP):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	@rm -f $(VENV)/.requirements-*
	@touch $@

$(EDITABLE_STAMP): | $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.editable-*
	@touch $@

horovod: $(HOROVOD_STAMP)

$(HOROVOD_STAMP): | $(STAMP)
	VENV=$(VENV) bash scripts/build_horovod.sh
	@touch $@

# Azurite (the Azure Storage emulator) for the Azure adapters' tests, pinned in package-lock.json.
azurite: node_modules/.bin/azurite

node_modules/.bin/azurite: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@

checkov: $(CHECKOV)

$(CHECKOV): requirements-checkov.txt
	@test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet -r requirements-checkov.txt
	@touch $@

# A real headless browser for the dashboard's test (Debian's chromium; installed once).
chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

demo: venv
	$(BIN)/retrain demo

# Everything: the lint (style, types, layer contracts), then every test (unit, integration, e2e).
test: venv horovod azurite chromium checkov lint
	RETRAIN_CHECKOV=$(CHECKOV) $(BIN)/python -m pytest

# The in-process tests only (seconds): tests/unit, no torchrun, Horovod or Azurite.
unit: venv
	$(BIN)/python -m pytest tests/unit -q -m "not integration"

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@# mypy's incremental cache sometimes crashes on a stale entry ("Cannot find module for google"): retry once without it.
	$(BIN)/mypy || (rm -rf .mypy_cache && $(BIN)/mypy)
	$(BIN)/lint-imports

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: venv
	$(BIN)/python benchmarks/train_throughput.py

# Mutation testing of the core with mutmut (pyproject: [tool.mutmut]); slow, so not in `make test`.
# `make mutate MUTANTS="worker.policy*"` narrows it. Results: `$(BIN)/mutmut results`; see docs/mutation.md.
MUTANTS ?=
mutate: venv
	$(BIN)/python -m pip install --quiet -r requirements-mutate.txt
	$(BIN)/mutmut run $(MUTANTS)
	$(BIN)/python scripts/mutation_scores.py
	$(BIN)/python scripts/check_mutations.py

clean-venv:
	rm -rf $(VENV)
