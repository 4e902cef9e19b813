# Two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A second environment with the oldest versions pyproject.toml allows (tests/oldest.txt).
OLDEST := .venv-oldest

.PHONY: demo test test-oldest lint bench clean

$(BIN)/activate: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(BIN)/activate

demo: $(BIN)/activate
	cd examples/order_flow && ../../$(BIN)/python order_flow.py

test: $(BIN)/activate test-oldest
	$(BIN)/python -m pytest -q -p no:cacheprovider
	$(BIN)/mypy
	$(BIN)/ruff check iii_embedded tests examples benchmarks

$(OLDEST)/bin/activate: pyproject.toml tests/oldest.txt
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/pip install --quiet --upgrade pip
	$(OLDEST)/bin/pip install --quiet -e ".[test]" -c tests/oldest.txt
	touch $(OLDEST)/bin/activate

# The tests that use each core dependency most, on its oldest allowed version.
test-oldest: $(OLDEST)/bin/activate
	$(OLDEST)/bin/python -m pytest -q -p no:cacheprovider tests/stores tests/test_lifecycle.py \
		tests/test_config_loader.py tests/test_calls_from_threads.py tests/test_queues.py

lint: $(BIN)/activate
	$(BIN)/mypy
	$(BIN)/ruff check iii_embedded tests examples benchmarks

bench: $(BIN)/activate
	$(BIN)/pip install --quiet -r benchmarks/requirements.txt
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) $(OLDEST) build *.egg-info
