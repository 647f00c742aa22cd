# Set-up is part of every target: the virtual environment is created (or updated
# when pyproject.toml changes) before anything runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: fit test lint docs clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

fit: $(BIN)/.installed  ## the seed recipe: make fit ARGS="--trainer.max_epochs 1"
	$(BIN)/python -m tl_project fit --config configs/base.yaml $(ARGS)

# Two workers, each test module on one worker (its module fixtures run once).
test: $(BIN)/.installed  ## the test suite, offline, on the CPU (Debian packages it needs first)
	bash scripts/system_packages.sh
	$(BIN)/python -m pytest -n 2 --dist loadfile $(ARGS)

lint: $(BIN)/.installed  ## ruff and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

docs: $(BIN)/.installed  ## the documentation site, built strictly, served at http://127.0.0.1:8000
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --strict

clean:
	rm -rf $(VENV)
