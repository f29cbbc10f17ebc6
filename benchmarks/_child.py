"""What the benchmarks' timed child processes share."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child_env(work: Path, **extra: str) -> dict[str, str]:
    """The environment of a timed child: this repository first on the path, and a bytecode cache (under ``work``)
    even where ``PYTHONDONTWRITEBYTECODE`` is set, as an installed package has its ``.pyc`` files: otherwise the
    modules a call imports lazily (the codecs a delta names) would be compiled inside the timed call."""
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": str(ROOT),
           "PYTHONPYCACHEPREFIX": str(work / "pycache"), **extra}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env
