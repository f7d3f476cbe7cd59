# `make demo` and `make test` are the two commands; each creates .venv on first use.
#
#   make test        ruff, mypy and pytest: the whole check, what CI runs (.ci/run only adds system
#                    packages and services, then calls it). With CI=true it also installs the heavy
#                    converter frameworks (PyTorch, TensorFlow), whose tests fail instead of skipping.
#   make test-full   the same with PyTorch and TensorFlow on any machine (about 2 GB more in .venv).
#   make wheel       dist/edgefleet-VERSION-py3-none-any.whl, what a device installs (docs/install-pi.md).
#   make test-container  docs/install-pi.md's container blocks in a booted Debian 12 with systemd (root;
#                    the root is cached in /var/cache/edgefleet-test). Also part of make test.
#   make demo        the end-to-end demo (README).
#
# PYTEST_ARGS narrows a run: `make test PYTEST_ARGS=tests/test_docs.py`. PYTEST_XDIST: the suite runs
# in two pytest-xdist workers, a test file at a time each (a file's module fixtures, such as a fleet of
# simulated devices, are set up once), heaviest files first (tests/conftest.py says which);
# `make test PYTEST_XDIST=` runs it in one process.
PY ?= python3
PYTEST_XDIST ?= -n 2 --dist loadfile --no-loadscope-reorder
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FULL_STAMP := $(VENV)/.installed-full
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' src/edgefleet/__init__.py)
DIST ?= dist
WHEEL := $(DIST)/edgefleet-$(VERSION)-py3-none-any.whl
# torch==2.13.0 exactly: on these machines that is the CPU build lying on disk (/opt/wheels); a looser
# pin pulls gigabytes of CUDA packages from the index. Override elsewhere: make test-full TORCH=torch.
TORCH ?= torch==2.13.0
TENSORFLOW ?= tensorflow-cpu>=2.16
PIP := $(BIN)/python -m pip --disable-pip-version-check

# Under CI=true the converter frameworks are part of the check (tests/test_convert.py fails without them).
ifeq ($(CI),true)
PYTEST_NEEDS := $(FULL_STAMP)
else
PYTEST_NEEDS := $(STAMP)
endif

.PHONY: demo test test-full test-container lint pytest pytest-full wheel bench fixtures clean

$(BIN)/python:
	$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "edgefleet needs Python 3.11 or later; $(PY) is $$($(PY) -V 2>&1) (make PY=python3.11 ...)" >&2; exit 1; }
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[dev]'
	touch $@

# PyTorch and TensorFlow, through the package's own extras (so the extras are what is tested).
$(FULL_STAMP): $(STAMP)
	$(PIP) install --quiet -e '.[dev,convert-tf,convert-torch]' '$(TORCH)' '$(TENSORFLOW)'
	touch $@

demo: $(STAMP)
	$(BIN)/edgefleet demo

test: lint pytest

test-full: lint pytest-full

lint: $(STAMP)
	$(BIN)/ruff check src/edgefleet agent fleet-server converters tests bench
	$(BIN)/mypy

# pytest exits 5 when it collected no tests: that is a failure here, never a pass.
define run_pytest
	$(BIN)/pytest $(PYTEST_XDIST) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make: pytest collected no tests (exit 5): that is a failure" >&2; fi; \
	exit $$rc
endef

pytest: $(PYTEST_NEEDS)
	$(run_pytest)

pytest-full: $(FULL_STAMP)
	$(run_pytest)

# Needs root, debootstrap and systemd-nspawn (.ci/run installs them); without them it skips, saying why.
test-container: $(STAMP)
	$(BIN)/pytest tests/test_docs_container.py $(PYTEST_ARGS)

# The wheel a device installs: `deploy/install-agent.sh dist/edgefleet-VERSION-py3-none-any.whl`.
# Built from a copy of the tree, so that a stale build/ folder (setuptools ships whatever is left in
# build/lib) cannot put deleted modules into it; always rebuilt (a few seconds).
WHEEL_EXCLUDES := .venv .git build dist .mypy_cache .ruff_cache .pytest_cache .hypothesis __pycache__ *.egg-info
wheel: | $(BIN)/python
	@mkdir -p $(DIST)
	rm -f $(DIST)/edgefleet-*.whl
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
		tar -cf - $(addprefix --exclude=,$(WHEEL_EXCLUDES)) . | tar -xf - -C "$$tmp" && \
		$(PIP) wheel --quiet --no-deps --wheel-dir "$(abspath $(DIST))" "$$tmp"
	test -f $(WHEEL) || { echo "make wheel: expected $(WHEEL)" >&2; exit 1; }
	@echo "built $(WHEEL)"

bench: $(STAMP)
	$(BIN)/python bench/runtime_overhead.py
	$(BIN)/python bench/api_roundtrip.py
	$(BIN)/python bench/agent_footprint.py
	$(BIN)/python bench/quantization.py

# Regenerates tests/fixtures/models (needs TensorFlow: see the script's docstring).
fixtures: $(FULL_STAMP)
	$(BIN)/python tests/fixtures/make_models.py

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
