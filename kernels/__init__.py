"""Triton kernels of srpo-core, installed as ``srpo_core.kernels``.

One file per op; each holds the ``@triton.jit`` kernel(s) and a launcher that checks strides, allocates outputs with
``srpo_core._dispatch.empty`` and launches. Nothing here validates user input or chooses a backend: the public
functions in ``srpo_core`` do that.
"""
