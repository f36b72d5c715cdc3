# Targets run inside the virtual environment that `make install` (or the README's set-up line) creates.
VENV   ?= .venv
PYTHON ?= $(if $(wildcard $(VENV)/bin/python),$(VENV)/bin/python,python)

.PHONY: install demo test lint bench

install:  ## fresh virtual environment in .venv with the package (editable) and dev tools
	python -m venv $(VENV)
	$(VENV)/bin/pip install torch==2.13.0 -e ".[dev]"

demo:  ## the offline end-to-end demo on the embedded model
	$(PYTHON) -m spqr_cli demo

test:  ## the test suite (GPU tests skip themselves without CUDA)
	$(PYTHON) -m pytest -q

bench:  ## layer speed, fp16 cuBLAS vs the SpQR Triton kernels (needs a CUDA GPU; exits with an error on CPU)
	$(PYTHON) -m spqr_cli bench

lint:
	$(PYTHON) -m ruff check .
