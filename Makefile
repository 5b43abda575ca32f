# Bedside: the two commands are `make demo` and `make test`; each creates .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: test test-slow demo lint bench clean postgres

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,postgres,interop]'
	@touch $(STAMP)

## postgres: PostgreSQL for the tests, installed with apt only if neither a server on
## 127.0.0.1:5432 nor initdb exists (never fails: without it those tests are skipped)
postgres:
	@PY=$(PY) sh tools/ensure-postgres.sh

## test: the whole suite (unit and system tests; slow campaigns excluded)
test: $(STAMP) postgres
	$(BIN)/python -m pytest -q

## test-slow: the long campaigns (marked slow)
test-slow: $(STAMP) postgres
	$(BIN)/python -m pytest -q -m slow

## demo: simulators, agent and control site on embedded defaults, accelerated time
demo: $(STAMP)
	$(BIN)/bedside demo

## lint: ruff, formatting, mypy and the import-layer contracts
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

## bench: throughput and latency figures, each beside the raw library doing the same work
bench: $(STAMP)
	$(BIN)/python -m tests.bench

clean:
	rm -rf $(VENV) build *.egg-info
