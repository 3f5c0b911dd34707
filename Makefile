# The README's two commands: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.srpo-installed

.PHONY: demo test lint bench gpu-report gpu-bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: this machine holds a CPU build of 2.13.0; an open range would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test,trl]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/srpo-core demo

test: $(STAMP)
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/srpo-core bench

gpu-report: $(STAMP)
	$(BIN)/python benchmarks/gpu_report.py

gpu-bench: $(STAMP)
	$(BIN)/python benchmarks/gpu_bench.py

lint: $(STAMP)
	$(BIN)/python -m pip install -q ruff
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis
