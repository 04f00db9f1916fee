"""Where cached work lives: $MPTQ_CACHE, or ~/.cache/mia-ptq-bench."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "MPTQ_CACHE"


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    # The XDG spec: an empty or relative XDG_CACHE_HOME is ignored (a relative one would move with the directory).
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "mia-ptq-bench"
