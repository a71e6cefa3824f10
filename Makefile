# Quick start: `make demo`, then `make test`. Both create .venv when it is missing and install pinned versions.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install install-dev demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/sdcompress stats --no-plot
	$(BIN)/sdcompress prune --keep 0.6 --force

test: install-dev
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python tools/bench_train.py

clean:
	rm -rf $(VENV) sdcompress-out build *.egg-info
