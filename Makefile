# The two commands a new user runs: `make demo` and `make test`.
# Both create .venv on first use. `make demo` installs only what the demo
# needs (torch, lightfunc, scikit-learn, tqdm, tensorboard); `make test` adds
# the rest (pytest, ruff, mypy, Lightning, matplotlib, triton, wandb, mlflow). torch is
# pinned to 2.13.0 for this dev environment only (a CPU wheel on these
# machines); the package itself asks for a range in pyproject.toml.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALL := $(PY) -m pip install --quiet
TORCH_PIN := torch==2.13.0
DEMO_STAMP := $(VENV)/.demo-installed
DEV_STAMP := $(VENV)/.dev-installed

.PHONY: demo test lint typecheck pytest bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(INSTALL) --upgrade pip

$(DEMO_STAMP): pyproject.toml Makefile | $(PY)
	$(INSTALL) "$(TORCH_PIN)" -e ".[demo]"
	touch $@

$(DEV_STAMP): $(DEMO_STAMP)
	$(INSTALL) "$(TORCH_PIN)" -e ".[dev]"
	touch $@

demo: $(DEMO_STAMP)
	$(PY) examples/digits.py

lint: $(DEV_STAMP)
	$(PY) -m ruff check lightfunc kernels tests examples bench
	$(PY) -m ruff format --check lightfunc kernels tests examples bench

typecheck: $(DEV_STAMP)
	$(PY) -m mypy

pytest: $(DEV_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test: lint typecheck pytest

bench: $(DEV_STAMP)
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
