"""Codec registry. Every module in this package that defines a :class:`Codec` subclass and calls
:func:`register_codec` is picked up automatically, so adding a codec is adding one file (named after
the codec, ``-`` as ``_``: :func:`get_codec` imports only the module of the codec it is asked for).
Third-party codecs register through the ``deltahub.codecs`` entry-point group.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import re
from importlib.metadata import entry_points

from ..errors import CodecError
from .base import Codec, EncodeInput, Encoded, matrix_view_shape

_REGISTRY: dict[str, Codec] = {}
_LOADED = False


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if cls.name in _REGISTRY and type(_REGISTRY[cls.name]) is not cls:
        raise CodecError(f"two codecs are named {cls.name!r}: {type(_REGISTRY[cls.name]).__module__} and {cls.__module__}")
    _REGISTRY[cls.name] = cls()
    return cls


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for module in sorted(_own_modules()):
        importlib.import_module(f"{__name__}.{module}")
    for ep in entry_points(group="deltahub.codecs"):
        ep.load()


@functools.lru_cache(maxsize=1)
def _own_modules() -> frozenset[str]:
    """The codec modules of this package (listed, not imported)."""
    return frozenset(i.name for i in pkgutil.iter_modules(__path__) if not i.name.startswith("_") and i.name != "base")


def get_codec(name: str) -> Codec:
    """The registered codec called ``name``; unknown names raise :class:`CodecError` listing the known ones.

    A built-in codec's own module is imported alone (rebuilding a delta loads the codecs it names, not every
    one); any other name loads every module and entry point first. ``name`` may come from a stranger's
    manifest: only a plain name that is one of this package's module names is ever imported by name."""
    codec = _REGISTRY.get(name) if isinstance(name, str) else None
    if codec is not None:
        return codec
    module = name.replace("-", "_") if isinstance(name, str) and re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name) else None
    if module is not None and module in _own_modules():
        importlib.import_module(f"{__name__}.{module}")
        codec = _REGISTRY.get(name)
        if codec is not None:
            return codec
    _load_all()
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise CodecError(f"unknown codec {name!r}; known codecs: {', '.join(sorted(_REGISTRY))}") from None


def available_codecs() -> list[str]:
    """Names of every registered codec, sorted."""
    _load_all()
    return sorted(_REGISTRY)


__all__ = ["Codec", "EncodeInput", "Encoded", "available_codecs", "get_codec", "matrix_view_shape", "register_codec"]
