"""``python -m srpo_core demo`` works like ``srpo-core demo``."""

import sys

from srpo_core.cli import main

sys.exit(main())
