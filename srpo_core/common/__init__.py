"""What both fast paths of an op share: the CPU path (``srpo_core.cpu``) and the Triton launchers
(``srpo_core.kernels``) import from here the per-token math and its derivatives, the fp16 scaling helpers, tile-size
rules and collectives they would otherwise have to take from each other or from the public entry (``srpo_core.ops``).
Modules here import only torch and ``_dispatch``, ``_validate``, ``config``, ``tuning``: never ``ops``, ``cpu`` or
``kernels``, so neither path climbs back up to its caller or sideways into the other.
"""
