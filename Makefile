# Two commands: `make demo` and `make test`. Each creates .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint pytest bench fixtures clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/edgefleet demo

test: lint pytest

lint: $(STAMP)
	$(BIN)/ruff check src/edgefleet agent fleet-server converters tests bench
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python bench/runtime_overhead.py
	$(BIN)/python bench/api_roundtrip.py
	$(BIN)/python bench/agent_footprint.py
	$(BIN)/python bench/quantization.py

# Regenerates tests/fixtures/models (needs TensorFlow: see the script's docstring).
fixtures:
	$(BIN)/python tests/fixtures/make_models.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
