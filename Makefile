# The README's two commands: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.srpo-installed
VERL_VENV ?= .venv-verl

.PHONY: demo test test-verl lint bench bench-docs gpu-report gpu-bench gpu-check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: this machine holds a CPU build of 2.13.0; an open range would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c .ci/constraints.txt -e ".[test,triton,trl,bench]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/srpo-core demo

test: $(STAMP)
	$(BIN)/pytest

# The verl adapter against the real verl, in a venv of its own (verl and trl pin conflicting transformers).
$(VERL_VENV)/.srpo-installed: pyproject.toml
	test -x $(VERL_VENV)/bin/python || $(PYTHON) -m venv $(VERL_VENV)
	$(VERL_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VERL_VENV)/bin/python -m pip install -q -c .ci/constraints.txt -e ".[test,verl]"
	touch $@

test-verl: $(VERL_VENV)/.srpo-installed
	$(VERL_VENV)/bin/pytest tests/test_adapter_verl.py -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/srpo-core bench

# The numbers in docs/benchmarks.md and the README: a full run (minutes), then the pages generated from its JSON.
# Run it on a quiet machine: every other process on the cores shows up in the medians.
bench-docs: $(STAMP)
	$(BIN)/srpo-core bench --no-progress --json docs/benchmarks.json --plot docs/benchmarks.png
	$(BIN)/python benchmarks/write_docs.py docs/benchmarks.json

gpu-report: $(STAMP)
	$(BIN)/python benchmarks/gpu_report.py

gpu-bench: $(STAMP)
	$(BIN)/python benchmarks/gpu_bench.py

# Everything a lent GPU validates, in one command with one summary line (docs/kernels.md, "GPU check"). No $(STAMP):
# the GPU machine has no package index, so this runs on whatever python has torch (.venv here, python3 there) and
# installs .whl/ (benchmarks/gpu_wheels.sh) offline. Without CUDA it runs the interpreter part and says so.
GPU_PYTHON ?= $(shell test -x $(BIN)/python && echo $(BIN)/python || echo $(PYTHON))
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

lint: $(STAMP)
	$(BIN)/python -m pip install -q ruff
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(VERL_VENV) build dist *.egg-info .pytest_cache .hypothesis
