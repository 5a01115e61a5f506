# One target per developer action. `make help` lists them.

PYTHON ?= python3
CARGO ?= cargo

.DEFAULT_GOAL := help
.PHONY: help install run test test-rust test-python lint fmt bench

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 16

install:  ## build qkd_core (release) and install it with S15qkd and the test tools
	$(PYTHON) -m pip install --quiet 'maturin>=1.7,<2' 'pytest>=7' 'hypothesis>=6' 'numpy>=1.23'
	$(PYTHON) -m pip install --quiet --no-build-isolation '.[test]'

run: install  ## simulate a two-node link on this machine and check both keystores
	qkdserver simulate

test: install test-rust test-python  ## run every test: cargo tests, then pytest

test-rust:  ## cargo tests of the Rust core
	$(CARGO) test --workspace --exclude qkd-python

test-python:  ## pytest against the installed packages
	$(PYTHON) -m pytest tests

lint:  ## rustfmt and clippy, warnings as errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:  ## format the Rust code
	$(CARGO) fmt --all

bench:  ## criterion benchmarks of the hot paths; see docs/benchmarks.md
	$(CARGO) bench --workspace --exclude qkd-python
