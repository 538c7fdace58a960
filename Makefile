# Two commands on a new machine: `make demo` and `make test`. Each installs what it needs.
#
# The virtual environment lives outside the work tree (torch alone is ~5.5 GB) and is shared by
# every clone on this machine. It is (re)synced only when a requirements file changes: the
# sha256 of those files is kept in a stamp inside the venv.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= $(HOME)/.cache/retrain/venv-py311
BIN := $(VENV)/bin
REQS := requirements.txt training/requirements.txt requirements-dev.txt
REQS_HASH := $(shell cat $(REQS) | sha256sum | cut -c1-16)
STAMP := $(VENV)/.requirements-$(REQS_HASH)
HOROVOD_STAMP := $(VENV)/.horovod-0.28.1

.PHONY: venv horovod demo test lint bench clean-venv

venv: $(STAMP)

$(STAMP): $(REQS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@rm -f $(VENV)/.requirements-*
	@touch $@

horovod: $(HOROVOD_STAMP)

$(HOROVOD_STAMP): $(STAMP) scripts/build_horovod.sh
	VENV=$(VENV) bash scripts/build_horovod.sh
	@touch $@

demo: venv
	$(BIN)/retrain demo

test: venv horovod
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: venv
	$(BIN)/python benchmarks/train_throughput.py

clean-venv:
	rm -rf $(VENV)
