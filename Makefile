# Two entry points a new user needs: `make demo` and `make test`. Both set everything up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test test-fast test-qemu lint demo system-deps venv clean

$(BIN)/otad: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/otad

system-deps:
	scripts/install-system-deps test

lint: venv
	$(BIN)/ruff check otad tests benchmarks
	$(BIN)/mypy

# Everything but the QEMU boots, then the QEMU group serially (skipped, with the reason printed,
# where qemu cannot be installed).
test: system-deps venv lint test-fast test-qemu

test-fast: venv
	$(BIN)/pytest -m "not qemu"

test-qemu: venv
	scripts/run-qemu-tests

demo: venv
	scripts/install-system-deps demo
	$(BIN)/otad demo

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
