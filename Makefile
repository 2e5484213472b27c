# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test clean-venv

$(VENV)/installed: requirements.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --requirement requirements.txt
	touch $@

demo: $(VENV)/installed
	$(PY) -m evaluation.demo

test: $(VENV)/installed
	$(PY) -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
