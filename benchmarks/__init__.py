"""Every benchmark of srpo-core, installed as ``srpo_core.bench`` (pyproject.toml maps this folder, as it maps
``kernels/`` to ``srpo_core.kernels``). Imports nothing, so ``srpo_core.bench.X`` is always the module.

`srpo-core bench` (srpo_core/cli.py) runs ``cases`` (the case table) through ``measure`` (time, peak memory) in
``suite`` (ratios, bars, JSON), on the machine ``host`` describes, and prints and plots with ``report``.
``test_bench_ops.py`` is the pytest-benchmark view of the same cases. The rest are scripts, run from the repository
as ``python benchmarks/X.py`` (docs/benchmarks.md, docs/kernels.md, the Makefile): per-op tables
(``bench_*.py``, ``linear_table.py``, ``policy_loss_table.py``, ``linear_cpu_forward.py``), the generated pages
(``write_docs.py``) and the GPU checks (``gpu_check.py``, ``gpu_report.py``, ``gpu_bench.py``, ``addr_audit.py``).
"""
