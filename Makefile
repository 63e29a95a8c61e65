# Set-up, demo and tests in one command each, on a fresh machine with Python 3.11+.
# TORCH picks the torch build: the default is a CPU build where the machine's pip offers one
# (as on our CI), else PyPI's. Set TORCH= to keep a torch already in the environment.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet $(TORCH) -e '.[test]'
	touch $@

.PHONY: install demo test
install: $(VENV)/.installed

demo: install
	$(VENV)/bin/raybooth run

test: install
	$(VENV)/bin/python -m pytest
