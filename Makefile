# Two targets a new user needs: `make demo` (the main job) and `make test`.
# Everything installs into .venv from nothing; pip caches the llama-cpp-python
# wheel (a ~9 minute source build on 2 cores) so later installs take seconds.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.fwdllm-installed
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: install demo demo-long test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -e '.[torch,bench,test]'
	touch $@

install: $(STAMP)

## The main job: a short federated fine-tuning run on the embedded default model.
demo: install
	$(BIN)/fwdllm simulate --model smollm2-135m --task sst2 --clients 4 --out runs/demo

## The same, long enough to reach the accuracy reported in the README.
demo-long: install
	$(BIN)/fwdllm simulate --model smollm2-135m --task sst2 --clients 4 --long --out runs/demo-long

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
