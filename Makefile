# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when needed.
# `make test` runs every test (CI); `make test-fast` leaves out those marked slow (pyproject.toml).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Test processes (pytest-xdist): most tests keep one core busy, so two use a 2-core CPU better
# (on an AVX2-only EPYC the tests took 1,770 s against 2,406 s in one process: each test is slower
# when two share the cores); each holds up to about 7 GB at its peak (TensorFlow).
# TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

.PHONY: demo cohort test test-fast lint clean-venv

# The project itself is installed in place (no dependencies: requirements.txt pins them), for the
# console scripts predict, evaluate, trace, train and synthetic in .venv/bin (pyproject.toml).
$(VENV)/installed: requirements.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --requirement requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation --editable .
	touch $@

# The cohort command's packages (Ray, pyarrow; python -m cohort, docs/cohort.md). The tests use
# them too, so `make test` installs them.
$(VENV)/cohort-installed: $(VENV)/installed requirements-cohort.txt constraints.txt
	$(PY) -m pip install --quiet --requirement requirements-cohort.txt
	touch $@

cohort: $(VENV)/cohort-installed

demo: $(VENV)/installed
	$(PY) -m demo

test: $(VENV)/installed $(VENV)/cohort-installed
	$(PYTEST) tests

test-fast: $(VENV)/installed $(VENV)/cohort-installed
	$(PYTEST) -m "not slow" tests

lint: $(VENV)/installed
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV)
