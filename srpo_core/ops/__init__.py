"""The public entry of every op: ``srpo_core/ops/X.py`` validates the inputs, picks the backend
(:func:`srpo_core._dispatch.pick_backend`), calls ``srpo_core/cpu/X.py``, ``srpo_core.kernels.X`` or
``srpo_core/reference/X.py``, and registers the ``torch.library`` custom op.

Nothing is imported here, so ``srpo_core.ops.X`` is always the module (``srpo_core`` itself exports the functions).
"""
