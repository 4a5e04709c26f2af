# The two commands a new user runs: `make demo` and `make test`.
# Both create .venv on first use. torch is pinned to 2.13.0 for this dev
# environment only (a CPU wheel on these machines); the package itself asks
# for a range in pyproject.toml.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)" -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/digits.py

lint: $(STAMP)
	$(PY) -m ruff check lightfunc kernels tests examples bench
	$(PY) -m ruff format --check lightfunc kernels tests examples bench

typecheck: $(STAMP)
	$(PY) -m mypy

pytest: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test: lint typecheck pytest

bench: $(STAMP)
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
