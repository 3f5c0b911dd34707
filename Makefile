# The README's two commands: `make demo` and `make test`. Both build .venv on first use, in two steps: the demo's
# own needs (torch, numpy, rich, srpo-core), then for `make test` the test, triton, trl and bench extras on top.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_STAMP := $(VENV)/.srpo-demo-installed
STAMP := $(VENV)/.srpo-installed
VERL_VENV ?= .venv-verl
OPENRLHF_VENV ?= .venv-openrlhf
# pip's own progress (one line per package and a bar per download), not -q: a first run must show what it is doing.
PIP_SHOW := --progress-bar on

.PHONY: demo test test-verl test-openrlhf lint bench bench-docs gpu-report gpu-bench gpu-check clean

$(DEMO_STAMP): pyproject.toml
	@echo "== [1/2] $(VENV): torch 2.13.0 (CPU), numpy, rich and srpo-core, what \`make demo\` needs =="
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch pinned: this machine holds a CPU build of 2.13.0; an open range would pull a multi-GB CUDA build.
	# --no-compile: no .pyc for torch's ~2,300 modules up front (Python writes those it imports on first use).
	$(BIN)/python -m pip install $(PIP_SHOW) --no-compile -c .ci/constraints.txt torch==2.13.0 -e .
	touch $@

$(STAMP): $(DEMO_STAMP)
	@echo "== [2/2] $(VENV): the test, triton, trl and bench extras, what \`make test\` needs on top =="
	$(BIN)/python -m pip install $(PIP_SHOW) --no-compile -c .ci/constraints.txt -e ".[test,triton,trl,bench]"
	touch $@

demo: $(DEMO_STAMP)
	$(BIN)/srpo-core demo

# one xdist worker per core (tests/conftest.py gives each worker its share of torch's threads)
test: $(STAMP)
	$(BIN)/pytest -n auto

# The verl adapter against the real verl, in a venv of its own (verl and trl pin conflicting transformers).
$(VERL_VENV)/.srpo-installed: pyproject.toml
	test -x $(VERL_VENV)/bin/python || $(PYTHON) -m venv $(VERL_VENV)
	$(VERL_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VERL_VENV)/bin/python -m pip install -q -c .ci/constraints.txt -e ".[test,verl]"
	touch $@

test-verl: $(VERL_VENV)/.srpo-installed
	$(VERL_VENV)/bin/pytest tests/test_adapter_verl.py -p no:cacheprovider

# The OpenRLHF adapter against the real OpenRLHF 0.11.2 (docs/adapters.md). openrlhf and vllm go in with --no-deps:
# openrlhf pins flash-attn==2.8.3 (CUDA only; the tests use tests/openrlhf_shim in its place) and vllm pins a CUDA
# torch; openrlhf.trainer.ray imports vllm at module level. deepspeed is a source archive that needs torch to build.
# The rest: what the experience maker and train_ppo_ray import, at the versions tested. .ci/run's third step (~7 min).
OPENRLHF_DEPS := ray==2.55.0 transformers==5.15.0 peft==0.21.2 torchdata==0.11.0 einops==0.8.2 sympy==1.14.0 \
	pylatexenc==2.11 aiohttp==3.14.5 pillow==13.0.0 numpy setuptools
$(OPENRLHF_VENV)/.srpo-installed: pyproject.toml
	test -x $(OPENRLHF_VENV)/bin/python || $(PYTHON) -m venv $(OPENRLHF_VENV)
	$(OPENRLHF_VENV)/bin/python -m pip install -q torch==2.13.0
	$(OPENRLHF_VENV)/bin/python -m pip install -q -c .ci/constraints.txt -e ".[test]" $(OPENRLHF_DEPS)
	$(OPENRLHF_VENV)/bin/python -m pip install -q -c .ci/constraints.txt --no-build-isolation deepspeed==0.19.6
	$(OPENRLHF_VENV)/bin/python -m pip install -q -c .ci/constraints.txt --no-deps openrlhf==0.11.2 vllm==0.29.0
	touch $@

test-openrlhf: $(OPENRLHF_VENV)/.srpo-installed
	$(OPENRLHF_VENV)/bin/pytest tests/test_adapter_openrlhf_real.py tests/test_adapter_openrlhf.py -p no:cacheprovider

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
# `make gpu-check GPU_CHECK_ARGS=--rehearse` (CI): the device's run, rehearsed here on a bare venv like the GPU image.
GPU_PYTHON ?= $(shell test -x $(BIN)/python && echo $(BIN)/python || echo $(PYTHON))
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

lint: $(STAMP)
	$(BIN)/python -m pip install -q ruff
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(VERL_VENV) $(OPENRLHF_VENV) build dist *.egg-info .pytest_cache .hypothesis
