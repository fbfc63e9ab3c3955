# One command runs lint, type checks and the whole test suite: `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: test test-postgres lint install serve

test: install lint
	$(BIN)/pytest

# The same suite with every test database on PostgreSQL (a server where tests may create
# databases; override PARLOUR_TEST_POSTGRES_URL to point elsewhere).
PARLOUR_TEST_POSTGRES_URL ?= postgresql+asyncpg://postgres@127.0.0.1:5432/postgres
test-postgres: install
	PARLOUR_TEST_POSTGRES_URL=$(PARLOUR_TEST_POSTGRES_URL) $(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

serve: install
	$(BIN)/parlour serve
