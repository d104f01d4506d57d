# Two commands on a fresh machine: `make train` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
ARGS   ?=

.PHONY: install train test test-all test-distributed bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

## The main job: class-conditional BigGAN on the embedded digits, on CPU (ARGS="key=value ..." for overrides).
train: install
	$(VENV)/bin/gan-train $(ARGS)

## The test suite CI runs (under 15 minutes on 2 CPU cores): everything but `slow` and `gpu` tests.
test: install
	$(PY) -m pytest -m "not slow and not gpu" -q $(ARGS)

## Everything, slow tests included (GPU tests skip themselves without a GPU).
test-all: install
	$(PY) -m pytest -q $(ARGS)

bench: install
	$(PY) bench/train_throughput.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache outputs
