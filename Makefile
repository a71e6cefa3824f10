# Quick start: `make demo`, then `make test`. Both create .venv when it is missing and install pinned versions.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install install-dev demo test bench clean

# pip -qq: errors only (a failed install still says why); no wall of build notices on a new user's first screen.
PIP    := $(BIN)/python -m pip -qq

$(BIN)/python:
	@if [ -L $(VENV) ] || { [ -e $(VENV) ] && [ ! -d $(VENV) ]; }; then \
		echo "$(VENV) is a link or a file, not a virtual environment; remove it (rm $(VENV)) and rerun"; exit 2; fi
	@echo "creating $(VENV) and installing the pinned dependencies (a few minutes the first time)"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(PIP) install -e '.[dev]'
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/sdcompress stats --no-plot
	$(BIN)/sdcompress prune --keep 0.6 --force

test: install-dev
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile

bench: install
	$(BIN)/python tools/bench_train.py

clean:
	rm -rf $(VENV) sdcompress-out build *.egg-info
