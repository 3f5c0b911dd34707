"""The gloo process group of the multi-process test workers (``dist_worker.py``, ``linear_logprobs_dist_worker.py``,
``token_logprobs_dist_worker.py``). They run as scripts, so this folder is their ``sys.path[0]`` and ``from gloo_group
import gloo_group`` finds this module; the tests that launch them import :func:`free_port` from it as
``srpo_core_test_gloo`` (registered by conftest.py)."""

from __future__ import annotations

import contextlib
import gc
import socket

import torch.distributed as dist


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int):
    """Join a ``world``-rank gloo group on ``127.0.0.1:port`` for the block; yield ``dist.group.WORLD``.

    On success every rank waits for the others (a barrier) before the group goes; on an exception the rank leaves at
    once, so the others fail on a closed connection instead of hanging. Either way the group is destroyed while Python
    is alive, after a garbage collection: autograd graphs of the sharded ops hold the group, and a gloo group that
    outlives interpreter finalisation has its worker thread drop tensors without a GIL to take, which aborts the
    process at exit ("terminate called without an active exception"). Keep those graphs in functions called inside
    the block, not in the caller's frame, which the collection cannot free.
    """
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    try:
        yield dist.group.WORLD
        dist.barrier()
    finally:
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a worker group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
