# Two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/activate: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(BIN)/activate

demo: $(BIN)/activate
	cd examples/order_flow && ../../$(BIN)/python order_flow.py

test: $(BIN)/activate
	$(BIN)/python -m pytest -q -p no:cacheprovider
	$(BIN)/mypy
	$(BIN)/ruff check iii_embedded tests examples benchmarks

lint: $(BIN)/activate
	$(BIN)/mypy
	$(BIN)/ruff check iii_embedded tests examples benchmarks

bench: $(BIN)/activate
	$(BIN)/pip install --quiet -r benchmarks/requirements.txt
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) build *.egg-info
