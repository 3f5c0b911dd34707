#!/usr/bin/env bash
# Fetch, HERE (a machine with PyPI), the wheels `make gpu-check` needs that the lent GPU machine lacks, into .whl/
# (ignored by git; name it in the device tool's `carry`). The GPU image (the device library's KINDS.md, Python 3.12,
# x86-64, torch 2.11, triton 3.6, transformers 5.17, accelerate, pytest, pytest-xdist, hypothesis, rich, numpy) has
# everything else. Only the benchmark anchors are missing:
#   trl 1.16.0             its Triton kernel trl.kernels.logprob_entropy and ChunkedLogProbFunction (both import
#                          without `datasets`, which trl lists but these modules never import: not carried)
#   liger-kernel 0.8.5     LigerCrossEntropyLoss / LigerFusedLinearCrossEntropyLoss
#   cut-cross-entropy 25.1.1  linear_cross_entropy (its Triton impl, "cce")
# All three are pure-Python wheels (about 1.9 MB together, well inside the 64 MiB a call may carry); their own needs
# (torch, triton, transformers, accelerate, numpy, packaging ...) are already on the image.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    trl==1.16.0 liger-kernel==0.8.5 cut-cross-entropy==25.1.1
ls -l .whl
du -ch .whl/*.whl | tail -1
