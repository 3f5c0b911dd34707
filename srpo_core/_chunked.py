"""Moved to :mod:`srpo_core.common.chunked` (this name stays for one release, for the paths not converted yet).

``USE_COMPILE`` reads and sets ``srpo_core.tuning.TUNING.use_compile``; ``_BROKEN`` reads the new module's state.
"""

from __future__ import annotations

import sys
import types

from srpo_core.common import chunked as _new
from srpo_core.common.chunked import *  # noqa: F403
from srpo_core.common.chunked import NO_COMPILE_ENV, __all__  # noqa: F401
from srpo_core.tuning import TUNING


class _Compat(types.ModuleType):
    @property
    def USE_COMPILE(self) -> bool | None:  # noqa: N802
        return TUNING.use_compile

    @USE_COMPILE.setter
    def USE_COMPILE(self, value: bool | None) -> None:  # noqa: N802
        TUNING.use_compile = value

    @property
    def _BROKEN(self) -> str | None:  # noqa: N802
        return _new._BROKEN


sys.modules[__name__].__class__ = _Compat
