# Two targets a new user needs: `make demo` (the main job) and `make test`.
# Everything installs into .venv from nothing; pip caches the llama-cpp-python
# wheel (a ~9 minute source build on 2 cores) so later installs take seconds.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.fwdllm-installed
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

# llama.cpp builds with -march=native, which on Intel Xeons from Sapphire Rapids on
# compiles in its AMX kernels; with llama-cpp-python 0.3.36 they crashed (SIGSEGV in
# ggml_backend_amx_mul_mat) on the first Q4_0 decode. Keep them out where the compiler
# knows the flags (x86); AVX-512 and the repacked Q4_0 kernels stay. A CMAKE_ARGS of
# your own (a CUDA build, say) replaces this.
NO_AMX := $(shell echo | $(CC) -mno-amx-tile -mno-amx-int8 -mno-amx-bf16 -x c -E - >/dev/null 2>&1 \
            && echo '-mno-amx-tile -mno-amx-int8 -mno-amx-bf16')
ifneq ($(NO_AMX),)
export CMAKE_ARGS ?= -DCMAKE_C_FLAGS="$(NO_AMX)" -DCMAKE_CXX_FLAGS="$(NO_AMX)"
endif

.PHONY: install demo demo-long test test-fast lint docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -e '.[torch,bench,eval,test]'
ifneq ($(NO_AMX),)
	@# pip reuses a wheel it built before, whatever CMAKE_ARGS said then: rebuild an AMX one.
	$(BIN)/python -c 'import sys, llama_cpp; sys.exit(b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info())' \
	  || $(BIN)/python -m pip install --no-cache-dir --force-reinstall --no-deps "$$($(BIN)/python -m pip freeze | grep -i '^llama.cpp.python==')"
endif
	touch $@

install: $(STAMP)

## The main job: a short federated fine-tuning run on the embedded default model
## (the sst2 recipe's few-minute schedule; fwdllm simulate --help).
demo: install
	$(BIN)/fwdllm simulate --model smollm2-135m --task sst2 --clients 4 --quick --out runs/demo

## The recipe's full schedule: the accuracy reported in the README.
demo-long: install
	$(BIN)/fwdllm simulate --model smollm2-135m --task sst2 --clients 4 --out runs/demo-long

## The whole suite (<= 5 minutes on 2 cores), and its inner-loop tier (<= 2 minutes):
## every tier but tests/system (tests/README.md). Two workers (pytest-xdist): most
## federation tests wait on sockets and deadlines, so a second one fills that idle core.
test: install
	$(BIN)/python -m pytest -q -n 2 --durations=10

test-fast: install
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

## The house rules (import-linter contracts in pyproject.toml; the suite runs them too).
lint: install
	$(BIN)/lint-imports

## docs/cli.md from every command's --help.
docs: install
	$(BIN)/python -c 'from fwdllm.cli import help_pages; print(help_pages())' > docs/cli.md

clean:
	rm -rf $(VENV) runs .pytest_cache
