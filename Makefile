# The two commands of the README: `make serve` (set up, then serve the demo models) and `make test`.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[compile,serve,bench,dev]'
	touch $(STAMP)

.PHONY: setup serve test test-quick lint
setup: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/sdaot serve --host 127.0.0.1 --port 8000

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q

test-quick: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
