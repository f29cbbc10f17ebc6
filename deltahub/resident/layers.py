"""Resident delta layers: :class:`DeltaLinear` wraps a shared base ``nn.Linear`` and holds, per adapter,
a delta in its stored (compressed) form, applied in the forward pass."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..codecs import get_codec
from ..codecs._bits import packed_cols, unpack_pm1
from ..codecs.base import Codec
from ..codecs.bitdelta import expand_scales, scale_shape
from ..errors import CodecError, DeltaHubError
from . import kernels

#: Output rows of a BitDelta sign matrix unpacked at once in the forward pass. The temporary
#: ±1 matrix holds ``CHUNK_ROWS * in_features`` elements of ``x``'s dtype.
CHUNK_ROWS = 1024

#: Codecs that never become resident delta modules.
_NOT_DELTA_CODECS = frozenset({"raw", "unchanged"})


class MixedAdapterError(DeltaHubError, ValueError):
    """A mixed batch selects adapters whose non-shareable (raw) tensors differ, or names an unknown adapter."""


def is_delta_codec(codec_name: str) -> bool:
    """True for codecs that store a decodable delta (``decode_delta``), i.e. can be resident modules."""
    if codec_name in _NOT_DELTA_CODECS:
        return False
    codec = get_codec(codec_name)
    return codec.needs_base and type(codec).decode_delta is not Codec.decode_delta


def _check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter names must be non-empty strings without '.', got {name!r}")


class _DeviceOnly(nn.Module):
    """A module whose buffers follow ``.to(device)`` but keep their dtype.

    The buffers are a storage format (packed bits, float32 scales, codec payloads), not compute
    weights: ``model.half()`` / ``model.to(torch.float64)`` must not round or reinterpret them.
    """

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> _DeviceOnly:  # type: ignore[override]
        for key, buf in self._buffers.items():
            if buf is not None:
                device = fn(torch.empty(0, dtype=buf.dtype, device=buf.device)).device
                self._buffers[key] = buf.to(device)
        return self


class _BitDeltaAdapter(_DeviceOnly):
    """One BitDelta delta in stored form: packed signs ``[out, ceil(in/8)]`` uint8 + float32 scales."""

    sign: torch.Tensor
    scale: torch.Tensor

    def __init__(self, sign: torch.Tensor, scale: torch.Tensor, params: dict[str, Any], shape: tuple[int, int], dtype: str) -> None:
        super().__init__()
        rows, cols = shape
        self.granularity: str = params["granularity"]
        self.group_size: int = int(params.get("group_size", 0))
        self.params = dict(params)
        self.shape = (rows, cols)
        self.dtype_name = dtype
        if tuple(sign.shape) != (rows, packed_cols(cols)) or sign.dtype != torch.uint8:
            raise CodecError(f"bitdelta: stored sign {sign.dtype} {list(sign.shape)} does not fit weight {list(shape)}")
        if tuple(scale.shape) != scale_shape(rows, cols, self.granularity, self.group_size):
            raise CodecError(f"bitdelta: stored scale {list(scale.shape)} does not fit weight {list(shape)} ({self.granularity})")
        self.register_buffer("sign", sign.contiguous(), persistent=False)
        self.register_buffer("scale", scale.to(torch.float32).contiguous(), persistent=False)

    codec_name = "bitdelta"

    def stored(self) -> dict[str, torch.Tensor]:
        """The stored tensors by role, as in the delta file."""
        return {"sign": self.sign, "scale": self.scale}

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole decoded delta ``where(bit, s, -s)`` as ``[out, in]`` (for merging / tests)."""
        rows, cols = self.shape
        s = expand_scales(self.scale, rows, cols, self.granularity, self.group_size)
        return (unpack_pm1(self.sign, cols, torch.float32) * s).to(dtype)

    def delta_matmul(self, x: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
        """``x @ Δ̂ᵀ`` for ``x`` ``[n, in]``: unpacking ``chunk_rows`` output rows of signs at a time, or
        from a cache kept on this adapter (``DELTAHUB_RESIDENT_CACHE``, :mod:`.kernels`)."""
        cache = self.__dict__.setdefault("_kernel_cache", {})
        return kernels.bitdelta_matmul(x, self.sign, self.scale, self.granularity, self.group_size, cache, chunk_rows)


class _GenericAdapter(_DeviceOnly):
    """Any other delta codec: its stored tensors as buffers, decoded with the codec when needed."""

    def __init__(self, codec: str, stored: dict[str, torch.Tensor], params: dict[str, Any], shape: tuple[int, int], dtype: str,
                 *, cache_decoded: bool = False) -> None:
        super().__init__()
        self.codec_name = codec
        self.params = dict(params)
        self.shape = shape
        self.dtype_name = dtype
        self.roles = list(stored)
        self.cache_decoded = cache_decoded
        for role, t in stored.items():
            self.register_buffer(f"stored_{role}", t.contiguous(), persistent=False)
        self._cache: torch.Tensor | None = None
        if cache_decoded:
            self._cache = self._decode()  # fail early on corrupt payloads

    def stored(self) -> dict[str, torch.Tensor]:
        """The stored tensors by role, as in the delta file."""
        return {role: getattr(self, f"stored_{role}") for role in self.roles}

    def _decode(self) -> torch.Tensor:
        d = get_codec(self.codec_name).decode_delta({k: v.cpu() for k, v in self.stored().items()}, self.params, self.shape)
        return d.reshape(self.shape)

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float32 decoded delta ``[out, in]`` (cached when ``cache_decoded``), cast to ``dtype``."""
        d = self._cache if self._cache is not None else self._decode()
        return d.to(dtype)

    def delta_matmul(self, x: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
        """``x @ Δ̂ᵀ`` for ``x`` ``[n, in]`` (the codec decodes the whole delta; codecs have no row-chunked decoder)."""
        if self._cache is not None and self._cache.device != x.device:
            self._cache = self._cache.to(x.device)
        if self._cache is not None:
            return x @ self.dense(x.dtype).T
        cache = self.__dict__.setdefault("_kernel_cache", {})
        return kernels.decoded_matmul(x, self._decode, cache, keep=False)


_Adapter = _BitDeltaAdapter | _GenericAdapter


# ---------------------------------------------------------------------------------------- DeltaLinear


class DeltaLinear(nn.Module):
    """An ``nn.Linear`` plus resident compressed deltas: ``y = base(x) + x @ Δ̂_activeᵀ``.

    The base layer is shared, never copied (its weight keeps its ``data_ptr``). Each adapter's
    delta lives in ``self.adapters[name]`` in stored form. Which delta applies is decided by
    ``disabled`` (base only), ``batch_adapters`` (one adapter name or ``None`` per batch row) and
    ``active_adapter``, in that order; the model-level functions of this module set them.
    """

    def __init__(self, base_layer: nn.Linear, *, chunk_rows: int = CHUNK_ROWS) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"DeltaLinear wraps an nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self._batch: list[str | None] | None = None
        self._groups: list[tuple[str | None, torch.Tensor]] = []
        self.disabled = False
        self.chunk_rows = chunk_rows

    @property
    def batch_adapters(self) -> list[str | None] | None:
        """One adapter name (or ``None``) per batch row, or ``None`` when every row uses ``active_adapter``."""
        return self._batch

    @batch_adapters.setter
    def batch_adapters(self, names: list[str | None] | None) -> None:
        self._batch = None if names is None else list(names)
        self._groups = []
        if names is not None:
            rows: dict[str | None, list[int]] = {}
            for i, n in enumerate(names):
                rows.setdefault(n, []).append(i)
            self._groups = [(n, torch.tensor(idx, dtype=torch.int64)) for n, idx in rows.items()]

    # Read-through attributes so code that inspects a Linear keeps working.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def add_adapter(self, name: str, codec: str, stored: dict[str, torch.Tensor], params: dict[str, Any], dtype: str = "float32",
                    *, cache_decoded: bool = False) -> None:
        """Store one adapter's delta for this layer (stored tensors as read from the delta file)."""
        _check_adapter_name(name)
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} is already attached to this layer")
        shape = (self.out_features, self.in_features)
        device = self.base_layer.weight.device
        stored = {k: v.to(device) for k, v in stored.items()}
        adapter: _Adapter
        if codec == "bitdelta":
            adapter = _BitDeltaAdapter(stored["sign"], stored["scale"], params, shape, dtype)
        elif is_delta_codec(codec):
            adapter = _GenericAdapter(codec, stored, params, shape, dtype, cache_decoded=cache_decoded)
        else:
            raise CodecError(f"codec {codec!r} does not store a delta; it cannot be a resident delta module")
        self.adapters[name] = adapter

    def delete_adapter(self, name: str) -> None:
        """Drop one adapter's delta from this layer."""
        del self.adapters[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def set_adapter(self, name: str | None) -> None:
        """Make ``name`` the delta applied to every row (``None``: base only)."""
        self.active_adapter = name

    @contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Context: this layer computes the base output only."""
        old, self.disabled = self.disabled, True
        try:
            yield
        finally:
            self.disabled = old

    def delta_weight(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The decoded delta ``Δ̂`` of adapter ``name`` as a dense ``[out, in]`` tensor."""
        return self.adapters[name].dense(dtype)

    def _delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        adapter = self.adapters[name]
        x2 = x.reshape(-1, self.in_features)
        return adapter.delta_matmul(x2, self.chunk_rows).reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x)`` plus the selected delta(s): all rows, or grouped by row adapter in a mixed batch."""
        y = self.base_layer(x)
        if self.disabled or not len(self.adapters):
            return y
        names = self.batch_adapters
        if names is not None:
            if x.dim() < 2 or x.shape[0] != len(names):
                raise MixedAdapterError(
                    f"use_adapters() was given {len(names)} adapter names but the batch has {x.shape[0] if x.dim() else 0} rows"
                )
            for name, idx in self._groups:
                if name is None or name not in self.adapters:
                    continue
                idx = idx.to(x.device)
                d = self._delta(name, x.index_select(0, idx))
                y = y.index_add(0, idx, d.to(y.dtype))
            return y
        name = self.active_adapter
        if name is None or name not in self.adapters:
            return y
        return y + self._delta(name, x).to(y.dtype)

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, active={self.active_adapter!r}, chunk_rows={self.chunk_rows}"


