"""What keeps a TRL step independent of the process split (``srpo_core/adapters/_trl_split.py``), without TRL: the
counterfactual exchange on 2 gloo ranks against the whole batch in one process, and corruption masks keyed per
image (``docs/trl.md``, "Several GPUs")."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from srpo_core_test_gloo import free_port  # tests/gloo_group.py, registered by conftest.py

from srpo_core.adapters._trl_split import corrupt_per_key
from srpo_core.corruption import corrupt_pixel_values

WORKER = pathlib.Path(__file__).with_name("trl_split_worker.py")
CASES = 64



@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_counterfactual_exchange_gives_the_whole_batch_rows(tmp_path):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(WORKER), str(free_port()), str(CASES)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}"
    assert f"split: OK {CASES}" in proc.stdout
    lent = [int(n) for n in re.findall(r"rank \d: (\d+) rows with a donor on the other rank", proc.stdout)]
    assert len(lent) == 2 and min(lent) > 0, proc.stdout  # both ranks borrowed: the exchange was exercised


def images(n: int, seed: int = 0):
    """``n`` Qwen-VL images of 4×4 patches (grid 1×4×4), rows of 3·2·14·14 values."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor([[1, 4, 4]] * n)
    return torch.randn(16 * n, 3 * 2 * 14 * 14, generator=g), grid


def test_corrupt_per_key_does_not_depend_on_the_other_images():
    pv, grid = images(6)
    keys = [10, 10, 11, 11, 12, 13]
    whole = corrupt_per_key(pv, grid, keys, seed=5, p=0.5)
    # the images of keys 11 and 12 alone (another process's share, in another order) get the same pixels
    part = [3, 2, 4]
    rows = torch.cat([torch.arange(16 * i, 16 * (i + 1)) for i in part])
    alone = corrupt_per_key(pv[rows], grid[part], [keys[i] for i in part], seed=5, p=0.5)
    assert torch.equal(alone, whole[rows])
    changed = (whole != pv).any(-1).view(6, 16)
    assert torch.equal(changed[0], changed[1]) and torch.equal(changed[2], changed[3])  # one mask per key
    assert 0 < int(changed.sum()) < changed.numel()
    assert not torch.equal(changed[0], changed[2]) or not torch.equal(changed[2], changed[4])
    # each key's mask is corrupt_pixel_values' own draw from a generator seeded by (seed, key)
    gen = torch.Generator().manual_seed(hash((5, 12)) % (2**63))
    torch.testing.assert_close(whole[64:80], corrupt_pixel_values(pv[64:80], grid[4:5], p=0.5, generator=gen),
                               rtol=0, atol=0)
    assert not torch.equal(corrupt_per_key(pv, grid, keys, seed=6, p=0.5), whole)  # the step's seed matters
    with pytest.raises(ValueError, match="one key per image"):
        corrupt_per_key(pv, grid, keys[:5], seed=5)
