"""Codec registry. Every module in this package that defines a :class:`Codec` subclass and calls
:func:`register_codec` is picked up automatically, so adding a codec is adding one file.
Third-party codecs register through the ``deltahub.codecs`` entry-point group.
"""

from __future__ import annotations

import importlib
import pkgutil
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
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    for ep in entry_points(group="deltahub.codecs"):
        ep.load()


def get_codec(name: str) -> Codec:
    """The registered codec called ``name``; unknown names raise :class:`CodecError` listing the known ones."""
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise CodecError(f"unknown codec {name!r}; known codecs: {', '.join(sorted(_REGISTRY))}") from None


def available_codecs() -> list[str]:
    """Names of every registered codec, sorted."""
    _load_all()
    return sorted(_REGISTRY)


__all__ = ["Codec", "EncodeInput", "Encoded", "available_codecs", "get_codec", "matrix_view_shape", "register_codec"]
