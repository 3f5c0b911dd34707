"""SPEC property 10: a batch split across ranks with a process group gives the weights of the whole batch in one
process. Two ranks on gloo via ``torch.multiprocessing.spawn``, driven by ``tests/dist_worker.py`` (see its docstring
for why it runs as a subprocess). One spawn checks 48 deterministic cases: B 0-8, empty slices, zero-length
trajectories, role mixes (mixed, perception only, reasoning only, none), fp32 and fp64, padded and packed, four
configs; tolerance 1e-6 (fp32) and 1e-12 (fp64)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch.distributed as dist
from srpo_core_test_gloo import free_port  # tests/gloo_group.py, registered by conftest.py

WORKER = pathlib.Path(__file__).with_name("dist_worker.py")
CASES = 48



@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_property10_split_across_ranks_matches_whole_batch(tmp_path):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
           "OMP_NUM_THREADS": "1"}
    # cwd outside the repository, so the root `kernels/` folder never lands on the children's sys.path.
    proc = subprocess.run([sys.executable, str(WORKER), str(free_port()), str(CASES)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}"
    assert f"property10: OK {CASES}" in proc.stdout
