"""Where cached work lives: $MPTQ_CACHE, or ~/.cache/mia-ptq-bench."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "MPTQ_CACHE"


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mia-ptq-bench"
