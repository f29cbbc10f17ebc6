"""deltahub: store fine-tuned LLMs as compressed deltas against their base model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .errors import DeltaHubError  # noqa: E402

if TYPE_CHECKING:
    from .delta import Delta
    from .loading import AutoDeltaModel

__all__ = ["AutoDeltaModel", "Delta", "DeltaHubError", "__version__"]

# Imported on first use, so ``import deltahub`` stays cheap (no torch / transformers / huggingface_hub).
_LAZY = {"AutoDeltaModel": ".loading", "Delta": ".delta"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
