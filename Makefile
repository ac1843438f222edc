# The two commands of the README: `make demo` and `make test`. Each sets up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/gptsan-demo

# The tests also install the Hugging Face port (the [peer] extra, about 25 s from a local wheel cache), so its
# parity tests run rather than skip.
$(BIN)/.installed-peer: $(BIN)/.installed
	$(BIN)/python -m pip install -q -e ".[test,peer]"
	touch $@

test: $(BIN)/.installed-peer
	$(BIN)/python -m pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check .
