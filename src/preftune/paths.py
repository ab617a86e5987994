"""Where preftune keeps things it builds once and reuses (converted models, the sentiment oracle)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root: ``$PREFTUNE_CACHE`` or ``~/.cache/preftune``. Created on demand."""
    root = Path(os.environ.get("PREFTUNE_CACHE", Path.home() / ".cache" / "preftune")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def shared_data_dir() -> Path:
    """Research data kept beside the project (never copied into it): ``$PREFTUNE_SHARED_DATA``
    or ``../shared/data`` relative to the repository root. May not exist."""
    env = os.environ.get("PREFTUNE_SHARED_DATA")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"
