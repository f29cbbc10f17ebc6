"""Which implementation runs the per-element loops of decoding: the native kernels or numpy/torch.

``deltahub/codecs/_native.c`` is built at install when a C compiler is present (``setup.py``,
an optional extension). It computes bit for bit what the numpy paths of ``_rng.py``,
``deltadq.py`` and ``_quant.py`` compute (tests run both), several times faster and without
scratch arrays. ``DELTAHUB_NATIVE=0`` forces the numpy paths (read at each call).
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

try:
    from . import _native as _NATIVE  # type: ignore[attr-defined]
except ImportError:  # no compiler at install time: the numpy paths
    _NATIVE = None

#: Elements per call of a native block kernel: large enough that the call costs nothing, small
#: enough that a tensor's blocks spread over the threads.
NATIVE_BLOCK = 1 << 18


def native_enabled() -> bool:
    """Whether ``DELTAHUB_NATIVE`` allows native kernels (read at each call; ``0`` turns every one off)."""
    return _allows(os.environ.get("DELTAHUB_NATIVE"))


@functools.lru_cache(maxsize=16)
def _allows(value: str | None) -> bool:
    return value is None or value.strip().lower() not in ("0", "false", "no", "off")


def native() -> ModuleType | None:
    """The native kernel module, or None when it is not built or ``DELTAHUB_NATIVE=0``."""
    if _NATIVE is None or not native_enabled():
        return None
    return _NATIVE


def native_available() -> bool:
    """Whether the native kernels were built (whatever ``DELTAHUB_NATIVE`` says)."""
    return _NATIVE is not None


#: Output dtypes the native kernels add a delta into in place, and the code they take for each
#: (0: float32; 1: bfloat16, 2: float16, rounded once to nearest even: format_spec.md section 4).
HALF_KINDS: dict[torch.dtype, int] = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
