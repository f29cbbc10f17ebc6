"""Pausing Python's cyclic garbage collector around bulk work (:func:`paused_gc`).

A rebuild or compression allocates many small containers (manifest entries, tensor headers, futures);
each allocation burst triggers collections that walk *every* tracked object of the process (torch and
transformers hold millions), which on a real model took ~20% of ``apply``'s CPU. Reference counting
still frees everything acyclic; cyclic garbage made meanwhile is collected once the pause ends.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_depth = 0
_was_enabled = False


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Disable the cyclic collector for the block (nested and concurrent uses are counted: it is
    re-enabled, if it was enabled before the first, when the last one exits)."""
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()
