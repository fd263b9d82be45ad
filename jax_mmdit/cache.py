"""Where the package keeps what it makes once and reuses: the C++ kernels (ops/onednn), the
evaluation classifiers and FID reference statistics (eval/)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "MMDIT_CACHE_DIR"


def cache_root() -> Path:
    """$MMDIT_CACHE_DIR, else $XDG_CACHE_HOME/jax_mmdit, else ~/.cache/jax_mmdit."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jax_mmdit"
