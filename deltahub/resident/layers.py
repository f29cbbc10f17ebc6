"""Resident delta layers: :class:`DeltaLinear` wraps a shared base ``nn.Linear`` and holds, per adapter,
a delta in its stored (compressed) form, applied in the forward pass."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..codecs import get_codec
from ..codecs._bits import pack_bits, packed_cols, unpack_pm1
from ..codecs.base import Codec
from ..codecs.bitdelta import expand_scales, scale_shape
from ..errors import CodecError, DeltaHubError
from . import _cpu, kernels
from .kernels import CHUNK_ROWS

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


def is_conv1d(module: nn.Module) -> bool:
    """A transformers ``Conv1D`` (GPT-2 family): a Linear whose weight is stored ``[in, out]``, ``y = x W + b``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None \
        and module.weight.dim() == 2


def _check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not name or "." in name or name == "__base__":
        raise ValueError(f"adapter names must be non-empty strings without '.' (and not '__base__'), got {name!r}")


class _DeviceOnly(nn.Module):
    """A module whose buffers follow ``.to(device)`` but keep their dtype.

    The buffers are a storage format (packed bits, float32 scales, codec payloads), not compute
    weights: ``model.half()`` / ``model.to(torch.float64)`` must not round or reinterpret them.
    """

    @property
    def kernel_cache(self) -> dict[Any, torch.Tensor]:
        """This adapter's speed cache (``DELTAHUB_RESIDENT_CACHE``, :mod:`.kernels`), kept across calls."""
        return self.__dict__.setdefault("_kernel_cache", {})

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> _DeviceOnly:  # type: ignore[override]
        for key, buf in self._buffers.items():
            if buf is not None:
                device = fn(torch.empty(0, dtype=buf.dtype, device=buf.device)).device
                self._buffers[key] = buf.to(device)
        self.__dict__.pop("_native_args", None)  # pointers into the old buffers
        self.__dict__.pop("_buffer_addresses", None)
        return self

    def native_args(self) -> tuple[int, tuple[Any, ...]] | None:
        """``(kind, arguments)`` of this adapter's native CPU kernel (:func:`._cpu.addmm_`), cached (the buffers'
        addresses; dropped when the buffers move), or None when it has none or its buffers are not on the CPU."""
        got = self.__dict__.get("_native_args", False)
        if got is False:
            got = self.__dict__["_native_args"] = self._make_native_args()
        return got

    def _make_native_args(self) -> tuple[int, tuple[Any, ...]] | None:
        return None


def _native_args_of(adapter: nn.Module) -> tuple[int, tuple[Any, ...]] | None:
    """An adapter's native kernel arguments (cached on it), or None for modules without a native form."""
    return adapter.native_args() if isinstance(adapter, _DeviceOnly) else None


def token_rows(idx: torch.Tensor, tokens: int) -> torch.Tensor:
    """The flattened token rows of batch rows ``idx`` in a ``[batch, tokens, ...]`` input."""
    return idx if tokens == 1 else (idx.reshape(-1, 1) * tokens + torch.arange(tokens, device=idx.device)).reshape(-1)


def _plain_linear(base: nn.Module) -> bool:
    """An ``nn.Linear`` itself (no subclass, no hooks): its forward is ``F.linear(x, W, b)``, so a fused product may
    stand in for it."""
    return type(base) is nn.Linear and not base._forward_hooks and not base._forward_pre_hooks


def _matmul_t_by_rows(shape: tuple[int, int], x: torch.Tensor, chunk_rows: int,
                      row_range: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """``x @ Δ̂`` for a delta stored as ``[in, out]`` (GPT-2's ``Conv1D``), accumulated over ``chunk_rows``
    decoded rows of ``Δ̂`` at a time (``row_range(r0, r1)``): bounded temporary memory."""
    rows, cols = shape
    out = x.new_zeros((x.shape[0], cols))
    for r0 in range(0, rows, chunk_rows):
        r1 = min(r0 + chunk_rows, rows)
        out.addmm_(x[:, r0:r1], row_range(r0, r1).to(device=x.device, dtype=x.dtype))
    return out


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
        return kernels.bitdelta_dense(self.sign, self.scale, self.shape[1], self.granularity, self.group_size, dtype)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` of the decoded delta as float32 ``[len(idx), in]`` (only those rows are unpacked)."""
        _, cols = self.shape
        s = self.scale if self.granularity == "tensor" else self.scale.index_select(0, idx)
        signs = unpack_pm1(self.sign.index_select(0, idx), cols, torch.float32)
        return signs * expand_scales(s, idx.numel(), cols, self.granularity, self.group_size)

    def _make_native_args(self) -> tuple[int, tuple[Any, ...]] | None:
        if self.sign.device.type != "cpu":
            return None
        return _cpu.bitdelta_args(self.sign, self.scale, self.granularity, self.group_size, self.shape)

    def native_addmm_(self, y: torch.Tensor, x: torch.Tensor, rows: torch.Tensor | None = None,
                      transposed: bool = False) -> bool:
        """``y[rows] += x[rows] @ Δ̂ᵀ`` in place by the native CPU kernel (:mod:`._cpu`), from the packed signs;
        False (nothing done) where it does not apply (another device or dtype, autograd, a cache mode other than
        ``none``: ``int8`` / ``dense`` ask for the torch path with that cache)."""
        return _cpu.try_addmm_(y, x, self, rows, transposed)

    def delta_matmul(self, x: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
        """``x @ Δ̂ᵀ`` for ``x`` ``[n, in]``: by the native CPU kernel for decode-sized float32 batches, else
        unpacking ``chunk_rows`` output rows of signs at a time, or from a cache kept on this adapter
        (``DELTAHUB_RESIDENT_CACHE``, :mod:`.kernels`)."""
        if x.shape[0] <= _cpu.MAX_NATIVE_ROWS:
            y = x.new_zeros((x.shape[0], self.shape[0]))
            if self.native_addmm_(y, x.contiguous()):
                return y
        return kernels.bitdelta_matmul(x, self.sign, self.scale, self.granularity, self.group_size, self.kernel_cache,
                                       chunk_rows)

    def delta_matmul_t(self, x: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
        """``x @ Δ̂`` (a delta stored ``[in, out]``, GPT-2's ``Conv1D``), ``chunk_rows`` rows of signs at a time."""
        if x.shape[0] <= _cpu.MAX_NATIVE_ROWS:
            y = x.new_zeros((x.shape[0], self.shape[1]))
            if self.native_addmm_(y, x.contiguous(), transposed=True):
                return y
        return _matmul_t_by_rows(self.shape, x, chunk_rows,
                                 lambda r0, r1: self.rows(torch.arange(r0, r1, device=self.sign.device)))


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

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` of the decoded float32 delta (the codec decodes the whole delta unless cached)."""
        d = self._cache if self._cache is not None else self._decode()
        return d.index_select(0, idx.to(d.device))

    def delta_matmul(self, x: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
        """``x @ Δ̂ᵀ`` for ``x`` ``[n, in]`` (the codec decodes the whole delta; codecs have no row-chunked decoder)."""
        if self._cache is not None and self._cache.device != x.device:
            self._cache = self._cache.to(x.device)
        if self._cache is not None:
            return x @ self.dense(x.dtype).T
        return kernels.decoded_matmul(x, self._decode, self.kernel_cache, keep=False)

    def delta_matmul_t(self, x: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
        """``x @ Δ̂`` (a delta stored ``[in, out]``, GPT-2's ``Conv1D``)."""
        if self._cache is not None:
            return x @ self.dense(x.dtype).to(x.device)
        return kernels.decoded_matmul(x, self._decode, self.kernel_cache, keep=False, transposed=True)


class _LowRankAdapter(_GenericAdapter):
    """A pure low-rank delta (``lowrank``, ``lowrank-mp``): ``Δ̂ = A @ Vh`` with ``A = float32(U)·S``, applied as
    ``(x @ Vhᵀ) @ Aᵀ`` — two thin matmuls, ``r·(out + in)`` multiply-adds per row instead of ``out·in``."""

    def __init__(self, codec: str, stored: dict[str, torch.Tensor], params: dict[str, Any], shape: tuple[int, int],
                 dtype: str) -> None:
        super().__init__(codec, stored, params, shape, dtype)
        u, s, vh = get_codec(codec).factors({k: v.cpu() for k, v in stored.items()}, params, shape)
        device = next(iter(stored.values())).device
        self.register_buffer("lr_a", (u.to(torch.float32) * s.to(torch.float32).reshape(1, -1)).to(device), persistent=False)
        self.register_buffer("lr_vh", vh.to(torch.float32).contiguous().to(device), persistent=False)

    def _decode(self) -> torch.Tensor:
        return (self.lr_a @ self.lr_vh).reshape(self.shape)  # low_rank_product's own operation: the codec's decode

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lr_a.index_select(0, idx.to(self.lr_a.device)) @ self.lr_vh

    def delta_matmul(self, x: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
        return (x @ self.lr_vh.T.to(x.dtype)) @ self.lr_a.T.to(x.dtype)

    def delta_matmul_t(self, x: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
        return (x @ self.lr_a.to(x.dtype)) @ self.lr_vh.to(x.dtype)


#: Codecs whose delta is exactly a low-rank product (resident mode keeps them as factors).
LOW_RANK_CODECS = ("lowrank", "lowrank-mp")

_MASK_TABLES: dict[torch.device, torch.Tensor] = {}


def _unpack_mask(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """:func:`unpack_bits` by a 256x8 table lookup (one gather; ~3x faster on CPU), bool ``[rows, cols]``."""
    table = _MASK_TABLES.get(packed.device)
    if table is None:
        table = ((torch.arange(256, device=packed.device).view(256, 1) >> torch.arange(8, device=packed.device)) & 1).bool()
        _MASK_TABLES[packed.device] = table
    rows = packed.shape[0]
    return table.index_select(0, packed.reshape(-1).long()).view(rows, packed.shape[1] * 8)[:, :cols]


#: Most distinct non-zero values a decoded delta may have to be kept as 4-bit codes (:class:`_CodebookAdapter`).
CODEBOOK_MAX = 16


class _CodebookAdapter(_DeviceOnly):
    """A decoded delta with at most 16 distinct non-zero values (DeltaDQ k-means, top-k ternary), kept compact.

    Decoded once at attach (entropy coding and the counter-based dropout mask are not re-run per
    forward pass) into: a packed non-zero bitmap ``[out, ceil(in/8)]`` (1 bit per weight), the
    non-zeros' 4-bit codebook indices in row-major order (2 per byte), each row's first non-zero
    index (int64) and the float32 codebook. Bit-exact: the codebook holds the decoded float32
    values themselves. DeltaDQ at p=0.75: 1 + 0.25·4 = 2 bits per weight.
    """

    nz: torch.Tensor
    codes: torch.Tensor
    row_ptr: torch.Tensor
    codebook: torch.Tensor

    def __init__(self, codec: str, dense: torch.Tensor, params: dict[str, Any], dtype: str, codebook: torch.Tensor) -> None:
        super().__init__()
        self.codec_name = codec
        self.params = dict(params)
        self.shape = (int(dense.shape[0]), int(dense.shape[1]))
        self.dtype_name = dtype
        mask = dense != 0
        idx = torch.searchsorted(codebook, dense[mask]).to(torch.uint8)  # exact: every non-zero value is in it
        if idx.numel() % 2:
            idx = torch.cat([idx, idx.new_zeros(1)])
        self.register_buffer("nz", pack_bits(mask), persistent=False)
        self.register_buffer("codes", (idx[0::2] | (idx[1::2] << 4)).contiguous(), persistent=False)
        counts = mask.sum(dim=1, dtype=torch.int64)
        self.register_buffer("row_ptr", torch.cat([counts.new_zeros(1), counts.cumsum(0)]), persistent=False)
        # padded to CODEBOOK_MAX entries (the native kernel loads all 16 at once; codes never point past the values)
        book = torch.zeros(CODEBOOK_MAX, dtype=torch.float32)
        book[:codebook.numel()] = codebook.to(torch.float32)
        self.register_buffer("codebook", book, persistent=False)

    @staticmethod
    def codebook_of(dense: torch.Tensor, stored_codebook: torch.Tensor | None = None) -> torch.Tensor | None:
        """The sorted distinct non-zero values of ``dense`` when there are at most :data:`CODEBOOK_MAX`, else None.

        ``stored_codebook``: a float32 table every decoded value is drawn from (DeltaDQ k-means decodes
        ``codebook[code]`` exactly), whose distinct non-zero entries then serve without sorting the delta.
        """
        if stored_codebook is not None:
            values = torch.unique(stored_codebook[stored_codebook != 0])
            if values.numel() <= CODEBOOK_MAX and bool(torch.isfinite(values).all()):
                return values
        values = torch.unique(dense[dense != 0])
        # a NaN would not be found by searchsorted: such a (hostile) delta stays in its generic form
        return values if values.numel() <= CODEBOOK_MAX and bool(torch.isfinite(values).all()) else None

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` of the decoded float32 delta (only those rows' bits and codes are read)."""
        cols = self.shape[1]
        mask = _unpack_mask(self.nz.index_select(0, idx), cols)
        starts, ends = self.row_ptr.index_select(0, idx), self.row_ptr.index_select(0, idx + 1)
        lengths = ends - starts
        total = int(lengths.sum())
        out = torch.zeros(idx.numel(), cols, dtype=torch.float32, device=self.codebook.device)
        if total:
            first = torch.repeat_interleave(starts - (lengths.cumsum(0) - lengths), lengths)
            k = first + torch.arange(total, device=first.device)
            code = (self.codes.index_select(0, k >> 1) >> ((k & 1) * 4).to(torch.uint8)) & 15
            out.masked_scatter_(mask, self.codebook.index_select(0, code.long()))
        return out

    def row_range(self, r0: int, r1: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``r0:r1`` of the decoded delta in ``dtype``: their codes are one contiguous run (no index gather)."""
        if self.nz.device.type == "cpu" and _cpu.available():
            return _cpu.codebook_decode(self, r0, r1).to(dtype)
        mask = _unpack_mask(self.nz[r0:r1], self.shape[1])
        k0, k1 = int(self.row_ptr[r0]), int(self.row_ptr[r1])
        out = torch.zeros(r1 - r0, self.shape[1], dtype=dtype, device=self.nz.device)
        if k1 > k0:
            packed = self.codes[k0 >> 1:(k1 + 1) >> 1]
            nibbles = torch.stack([packed & 15, packed >> 4], dim=1).reshape(-1)[k0 & 1:(k0 & 1) + k1 - k0]
            out.masked_scatter_(mask, self.codebook.to(dtype).index_select(0, nibbles.long()))
        return out

    def stored(self) -> dict[str, torch.Tensor]:
        """The resident tensors by role (not the delta file's: decoded and re-packed at attach)."""
        return {"nz": self.nz, "codes": self.codes, "row_ptr": self.row_ptr, "codebook": self.codebook}

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole decoded delta ``[out, in]``."""
        return self.row_range(0, self.shape[0], dtype)

    def _make_native_args(self) -> tuple[int, tuple[Any, ...]] | None:
        if self.nz.device.type != "cpu":
            return None
        return _cpu.codebook_args(self.nz, self.codes, self.row_ptr, self.codebook, self.shape)

    def buffer_addresses(self) -> tuple[int, int, int, int]:
        """``(nz, codes, row_ptr, codebook)`` addresses for the fused GPU kernel (:func:`.kernels.codebook_sgmv`),
        with the buffers' sizes checked once; cached until the buffers move."""
        got = self.__dict__.get("_buffer_addresses")
        if got is None:
            rows, cols = self.shape
            if (tuple(self.nz.shape) != (rows, (cols + 7) // 8) or self.codebook.numel() != CODEBOOK_MAX
                    or self.row_ptr.numel() != rows + 1 or not all(t.is_contiguous() for t in self.stored().values())
                    or len({t.device for t in self.stored().values()}) != 1 or int(self.row_ptr[-1]) >= 2**31):
                raise ValueError(f"codebook adapter buffers do not fit its delta {[rows, cols]} (or over 2**31 non-zeros)")
            got = self.__dict__["_buffer_addresses"] = (self.nz.data_ptr(), self.codes.data_ptr(), self.row_ptr.data_ptr(),
                                                        self.codebook.data_ptr())
        return got

    def native_addmm_(self, y: torch.Tensor, x: torch.Tensor, rows: torch.Tensor | None = None,
                      transposed: bool = False) -> bool:
        """``y[rows] += x[rows] @ Δ̂ᵀ`` in place by the native CPU kernel (:mod:`._cpu`), from the bitmap and codes;
        False (nothing done) where it does not apply (another device or dtype, autograd, a cache mode other than
        ``none``: ``int8`` / ``dense`` ask for the torch path with that cache)."""
        return _cpu.try_addmm_(y, x, self, rows, transposed)

    def delta_matmul(self, x: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
        """``x @ Δ̂ᵀ``: by the native CPU kernel for decode-sized float32 batches, else decoding ``chunk_rows``
        output rows at a time (bounded temporary memory), or from the decoded delta cached on this adapter when
        ``DELTAHUB_RESIDENT_CACHE=dense`` (:mod:`.kernels`)."""
        if kernels.cache_mode() == "dense":
            return kernels.decoded_matmul(x, self.dense, self.kernel_cache, keep=True)
        self.kernel_cache.clear()
        if x.shape[0] <= _cpu.MAX_NATIVE_ROWS:
            y = x.new_zeros((x.shape[0], self.shape[0]))
            if self.native_addmm_(y, x.contiguous()):
                return y
        rows = self.shape[0]
        out = x.new_empty((x.shape[0], rows))
        for r0 in range(0, rows, chunk_rows):
            r1 = min(r0 + chunk_rows, rows)
            out[:, r0:r1] = x @ self.row_range(r0, r1, x.dtype).T
        return out

    def delta_matmul_t(self, x: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
        """``x @ Δ̂`` (a delta stored ``[in, out]``, GPT-2's ``Conv1D``), ``chunk_rows`` rows at a time."""
        if kernels.cache_mode() == "dense":
            return kernels.decoded_matmul(x, self.dense, self.kernel_cache, keep=True, transposed=True)
        if x.shape[0] <= _cpu.MAX_NATIVE_ROWS:
            y = x.new_zeros((x.shape[0], self.shape[1]))
            if self.native_addmm_(y, x.contiguous(), transposed=True):
                return y
        return _matmul_t_by_rows(self.shape, x, chunk_rows, lambda r0, r1: self.row_range(r0, r1, x.dtype))


_Adapter = _BitDeltaAdapter | _GenericAdapter | _CodebookAdapter


def make_adapter(codec: str, stored: dict[str, torch.Tensor], params: dict[str, Any], shape: tuple[int, int], dtype: str,
                 *, cache_decoded: bool = False) -> _Adapter:
    """The resident form of one delta: packed BitDelta, low-rank factors (``lowrank``, ``lowrank-mp``), a 4-bit
    codebook form when the decoded delta has few distinct values (DeltaDQ k-means, top-k ternary), else the
    stored tensors (decoded per use)."""
    if codec == "bitdelta":
        return _BitDeltaAdapter(stored["sign"], stored["scale"], params, shape, dtype)
    if not is_delta_codec(codec):
        raise CodecError(f"codec {codec!r} does not store a delta; it cannot be a resident delta module")
    if codec in LOW_RANK_CODECS and not cache_decoded:
        return _LowRankAdapter(codec, stored, params, shape, dtype)
    if not cache_decoded:
        dense = get_codec(codec).decode_delta({k: v.cpu() for k, v in stored.items()}, params, shape).reshape(shape)
        table = stored.get("codebook") if codec == "deltadq" and params.get("quantizer") == "kmeans" else None
        book = _CodebookAdapter.codebook_of(dense, table.cpu().to(torch.float32) if table is not None else None)
        if book is not None:
            device = next(iter(stored.values())).device
            return _CodebookAdapter(codec, dense, params, dtype, book).to(device)
    return _GenericAdapter(codec, stored, params, shape, dtype, cache_decoded=cache_decoded)


# ---------------------------------------------------------------------------------------- DeltaLinear


BASE_ADAPTER = "__base__"


@functools.lru_cache(maxsize=256)
def _groups(names: tuple[str | None, ...], nrows: int, expand: bool) -> tuple[tuple[str | None, torch.Tensor], ...]:
    if nrows != len(names):
        if not expand or nrows % len(names):
            raise MixedAdapterError(f"{len(names)} adapter names were given but the batch has {nrows} rows")
        k = nrows // len(names)  # generate() repeats each input row k times (beams / return sequences)
        names = tuple(n for n in names for _ in range(k))
    rows: dict[str | None, list[int]] = {}
    for i, n in enumerate(names):
        rows.setdefault(None if n == BASE_ADAPTER else n, []).append(i)
    return tuple((n, torch.tensor(idx, dtype=torch.int64)) for n, idx in rows.items())


def row_groups(names: list[str | None], nrows: int, expand: bool = False) -> tuple[tuple[str | None, torch.Tensor], ...]:
    """Batch rows grouped by adapter: ``((name, row indices), ...)``; ``None`` / ``"__base__"`` is the base.

    With ``expand`` a batch of ``k * len(names)`` rows is row ``i`` repeated ``k`` times each
    (``generate``'s beam / return-sequence expansion, as in PEFT); otherwise the counts must match.
    """
    return _groups(tuple(names), nrows, expand)


class CallInfo:
    """Facts of the running model call, shared by every resident wrapper of one model (set by the model's
    forward pre-hook, cleared by its forward hook): the batch size, and the native kernels' flags
    (:func:`._cpu.call_flags`, read once per call instead of once per layer; ``None`` outside a model call)."""

    __slots__ = ("native", "rows")

    def __init__(self) -> None:
        self.rows = 0
        self.native: _cpu.Flags | None = None


class RoutedModule(nn.Module):
    """Common selection state of resident wrappers: ``disabled``, per-row ``batch_adapters``, ``active_adapter``."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapter: str | None = None
        self.batch_adapters: list[str | None] | None = None
        self.batch_expand = False
        self.disabled = False
        #: The running model call, shared with the model's resident state: inputs that arrive with one row for
        #: the whole batch (GPT-2 / OPT position ids) are broadcast to its batch size in a mixed batch, so
        #: learned position embeddings route per row too.
        self.call_info = CallInfo()

    def get_base_layer(self) -> nn.Module:
        """The wrapped base module (PEFT's name)."""
        return self.base_layer

    def broadcast_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` expanded to the model call's batch size when a mixed batch meets a one-row input (position ids)."""
        rows = self.call_info.rows
        if self.batch_adapters is not None and not self.disabled and x.dim() >= 2 and x.shape[0] == 1 and rows > 1:
            return x.expand(rows, *x.shape[1:])
        return x

    def selection(self, nrows: int) -> tuple[tuple[str | None, torch.Tensor], ...] | str | None:
        """Row groups in a mixed batch, else the one adapter for every row (``None``: base only)."""
        if self.disabled:
            return None
        if self.batch_adapters is not None:
            return row_groups(self.batch_adapters, nrows, self.batch_expand)
        return self.active_adapter


class AdapterLayer(RoutedModule):
    """A resident wrapper holding per-adapter deltas in ``self.adapters`` (:class:`DeltaLinear`, ``DeltaEmbedding``)."""

    def __init__(self, base_layer: nn.Module, *, chunk_rows: int = CHUNK_ROWS) -> None:
        super().__init__(base_layer)
        self.adapters = nn.ModuleDict()
        self.chunk_rows = chunk_rows

    def _check_new(self, name: str) -> None:
        _check_adapter_name(name)
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} is already attached to this layer")

    def add_adapter_module(self, name: str, adapter: nn.Module) -> None:
        """Attach an already built resident delta (a tied LM head and embedding share one: no copy)."""
        self._check_new(name)
        self.adapters[name] = adapter

    def delete_adapter(self, name: str) -> None:
        """Drop one adapter's delta from this layer."""
        self.__dict__.pop("_mixed_plan", None)
        self.__dict__.pop("_sgmv_plans", None)
        del self.adapters[name]
        if self.active_adapter == name:
            self.active_adapter = None


class DeltaLinear(AdapterLayer):
    """An ``nn.Linear`` plus resident compressed deltas: ``y = base(x) + x @ Δ̂_activeᵀ``.

    The base layer is shared, never copied (its weight keeps its ``data_ptr``). Each adapter's
    delta lives in ``self.adapters[name]`` in stored form. Which delta applies is decided by
    ``disabled`` (base only), ``batch_adapters`` (one adapter name or ``None`` per batch row) and
    ``active_adapter``, in that order; the model-level functions of this module set them.
    """

    def __init__(self, base_layer: nn.Module, *, chunk_rows: int = CHUNK_ROWS) -> None:
        if not isinstance(base_layer, nn.Linear) and not is_conv1d(base_layer):
            raise TypeError(f"DeltaLinear wraps an nn.Linear or a transformers Conv1D, got {type(base_layer).__name__}")
        super().__init__(base_layer, chunk_rows=chunk_rows)
        #: PEFT's name: the base weight (and every delta of it) is stored ``[in, out]`` (GPT-2's ``Conv1D``).
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)
        #: Exact per-adapter biases (a fine-tune that changed this Linear's bias): swapped into the base layer
        #: when one adapter serves every row, added per row group in a mixed batch.
        self.raw_bias: dict[str, torch.Tensor] = {}

    # Read-through attributes so code that inspects a Linear keeps working.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return int(self.base_layer.weight.shape[0 if self.fan_in_fan_out else 1])

    @property
    def out_features(self) -> int:
        return int(self.base_layer.weight.shape[1 if self.fan_in_fan_out else 0])

    def add_adapter(self, name: str, codec: str, stored: dict[str, torch.Tensor], params: dict[str, Any], dtype: str = "float32",
                    *, cache_decoded: bool = False) -> None:
        """Store one adapter's delta for this layer (stored tensors as read from the delta file)."""
        self._check_new(name)
        shape = (int(self.base_layer.weight.shape[0]), int(self.base_layer.weight.shape[1]))  # the stored layout
        device = self.base_layer.weight.device
        stored = {k: v.to(device) for k, v in stored.items()}
        self.adapters[name] = make_adapter(codec, stored, params, shape, dtype, cache_decoded=cache_decoded)

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

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """PEFT's name for :meth:`delta_weight`, in the base weight's dtype."""
        return self.delta_weight(adapter, self.base_layer.weight.dtype)

    def _delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        adapter = self.adapters[name]
        x2 = x.reshape(-1, self.in_features)
        y = adapter.delta_matmul_t(x2, self.chunk_rows) if self.fan_in_fan_out else adapter.delta_matmul(x2, self.chunk_rows)
        return y.reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x)`` plus the selected delta(s): all rows, or grouped by row adapter in a mixed batch."""
        # runs once per Linear per decode step: plain dict look-ups instead of nn.Module attribute access
        mods = self._modules["adapters"]._modules  # type: ignore[union-attr]
        base = self._modules["base_layer"]
        assert base is not None
        if self.disabled or (not mods and not self.raw_bias):
            return base(x)
        if self.batch_adapters is not None:
            return self._forward_mixed(x, row_groups(self.batch_adapters, x.shape[0] if x.dim() >= 2 else 0,
                                                     self.batch_expand))
        name = self.active_adapter
        adapter = mods.get(name) if name is not None else None
        if adapter is None:
            return base(x)
        fused = self._native_fused(x, base, adapter)
        if fused is None:
            fused = self._rebuilt_product(x, base, adapter)
        if fused is not None:
            return fused
        y = base(x)
        if x.is_cuda and not self.fan_in_fan_out and kernels.fused_sgmv_applies(x, [adapter]):
            x2 = x.reshape(-1, self.in_features)  # one segment: the fused kernel decodes tiles in registers
            seg = torch.tensor([[0, x2.shape[0], 0]], dtype=torch.int32)
            d = kernels.delta_matmul_segments(x2, seg, [adapter], fused=True)
            return y + d.reshape(*x.shape[:-1], self.out_features).to(y.dtype)
        if self._native_add(y, x, adapter):
            return y
        return y + self._delta(name, x).to(y.dtype)  # type: ignore[arg-type]

    def _forward_mixed(self, x: torch.Tensor, sel: tuple[tuple[str | None, torch.Tensor], ...]) -> torch.Tensor:
        """A mixed batch: the base output once, then each row group's delta added to its rows."""
        if self.raw_bias and any(name in self.raw_bias for name, _ in sel if name is not None):
            return self._mixed_with_biases(x, sel)
        mods = self._modules["adapters"]._modules  # type: ignore[union-attr]
        y = self.base_layer(x)
        if x.is_cpu and self._native_mixed(y, x, sel, mods):
            return y
        groups = [(name, idx) for name, idx in sel if name is not None and name in mods]
        if not groups:
            return y
        if not self.fan_in_fan_out and kernels.fused_sgmv_applies(x, [mods[n] for n, _ in groups]):
            return y + self._delta_sgmv(x, groups).to(y.dtype)
        for name, idx in groups:  # (the native kernels, where they apply, ran in _native_mixed)
            idx = idx.to(x.device)
            d = self._delta(name, x.index_select(0, idx))
            y = y.index_add(0, idx, d.to(y.dtype))
        return y

    def _native_mixed(self, y: torch.Tensor, x: torch.Tensor, sel: tuple[tuple[str | None, torch.Tensor], ...],
                      mods: dict[str, Any]) -> bool:
        """A mixed batch's deltas added into ``y`` by one native call, from a plan kept per selection (``sel`` is
        :func:`row_groups`' cached tuple, the same object at every decode step): each adapter's kernel arguments
        and token rows, checked once; per call only the buffers' addresses change. False where the native path
        does not apply (then the general path runs)."""
        flags = self._native_flags()
        if (not flags or x.dtype is not torch.float32 or y.dtype is not torch.float32 or not y.is_cpu
                or not y.is_contiguous() or x.dim() < 2 or (torch.is_grad_enabled() and (x.requires_grad or y.requires_grad))):
            return False
        w = self._modules["base_layer"].weight  # type: ignore[union-attr]
        nin, nout = (w.shape[0], w.shape[1]) if self.fan_in_fan_out else (w.shape[1], w.shape[0])
        if x.shape[-1] != nin or y.shape[-1] != nout or not x.shape[0]:
            return False
        x2 = x.reshape(-1, nin)
        tokens = x2.shape[0] // x.shape[0]
        entry = self.__dict__.get("_mixed_plan")
        stale = entry is None or entry[0] is not sel or entry[1] != tokens
        if not stale:
            for adapter, args in entry[3]:  # an adapter moved (its buffers' addresses changed); replaced: delete_adapter
                if adapter.__dict__.get("_native_args") is not args:
                    stale = True
                    break
        if stale:
            entry = self.__dict__["_mixed_plan"] = (sel, tokens, *self._make_mixed_plan(sel, mods, tokens))
        plan = entry[2]
        if plan is None:
            return False
        if plan:
            x2 = x2.contiguous()
            xp, yp, n = x2.data_ptr(), y.data_ptr(), x2.shape[0]
            t = self.fan_in_fan_out
            simd, threads = flags
            _cpu.run_many([_cpu.job(args, xp, nin, n, rp, k, yp, nout, n, t, simd, threads) for args, rp, k, _ in plan],
                          threads)
        return True

    def _make_mixed_plan(self, sel: tuple[tuple[str | None, torch.Tensor], ...], mods: dict[str, Any],
                         tokens: int) -> tuple[list[tuple[_cpu.NativeArgs, int, int, torch.Tensor]] | None, list[Any]]:
        """``([(native args, rows address, row count, rows), ...] or None, [(adapter, its native args), ...])``."""
        plan: list[tuple[_cpu.NativeArgs, int, int, torch.Tensor]] = []
        used: list[Any] = []
        for name, idx in sel:
            adapter = mods.get(name) if name is not None else None
            if adapter is None:
                continue
            native = _native_args_of(adapter)
            used.append((adapter, native))
            rows = token_rows(idx, tokens).to(device="cpu", dtype=torch.int64).contiguous()
            if native is None or rows.numel() > _cpu.MAX_NATIVE_ROWS:
                return None, used
            plan.append((native, rows.data_ptr(), rows.numel(), rows))
        return plan, used

    def _rebuilt_product(self, x: torch.Tensor, base: nn.Module, adapter: nn.Module) -> torch.Tensor | None:
        """``F.linear(x, dtype(float32(W) + Δ̂), b)`` with the rebuilt weight formed ``chunk_rows`` output rows at a
        time, for prefill-sized batches on the CPU (more than :data:`._cpu.MAX_NATIVE_ROWS` token rows) of a plain
        ``nn.Linear`` with a codebook or BitDelta adapter: one GEMM per chunk instead of the base GEMM plus a
        second GEMM over the decoded delta, and the rebuilt model's own weight rounding. None where it does not
        apply (autograd, hooks, another device, a decode-sized batch)."""
        if not _plain_linear(base) or not x.is_cpu:
            return None
        w, b = base.weight, base.bias
        if (x.dtype != w.dtype or not w.is_cpu or x.shape[-1] != w.shape[1] or x.numel() // max(w.shape[1], 1) <= _cpu.MAX_NATIVE_ROWS
                or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)))):
            return None
        if isinstance(adapter, _CodebookAdapter):
            decode = adapter.row_range
        elif isinstance(adapter, _BitDeltaAdapter):
            def decode(r0: int, r1: int) -> torch.Tensor:
                return adapter.rows(torch.arange(r0, r1, device=adapter.sign.device))
        else:
            return None
        rows = w.shape[0]
        x2 = x.reshape(-1, w.shape[1])
        parts = []
        for r0 in range(0, rows, self.chunk_rows):
            r1 = min(r0 + self.chunk_rows, rows)
            wc = (w[r0:r1].to(torch.float32) + decode(r0, r1)).to(w.dtype)
            parts.append(nn.functional.linear(x2, wc, None if b is None else b[r0:r1]))
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return y.reshape(*x.shape[:-1], rows)

    def _native_fused(self, x: torch.Tensor, base: nn.Module, adapter: nn.Module) -> torch.Tensor | None:
        """``x @ (W + Δ̂)ᵀ + b`` for one codebook or BitDelta adapter in one native pass over the base weight and the resident
        delta (the rebuilt weight ``fp32(W + Δ̂)`` formed in registers, as the rebuilt model holds it), for a plain
        float32 ``nn.Linear`` (no hooks) and decode-sized batches; None where it does not apply."""
        flags = self._native_flags()
        if not flags or not _plain_linear(base):
            return None
        w, b = base.weight, base.bias
        if (x.dtype is not torch.float32 or w.dtype is not torch.float32 or not x.is_cpu or not w.is_cpu
                or not w.is_contiguous() or (b is not None and (b.dtype is not torch.float32 or not b.is_cpu))
                or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)))):
            return None
        args = _native_args_of(adapter)
        # codebook adapters; BitDelta with tensor / row scales (group scales: the two-pass path)
        if args is None or w.shape[1] != x.shape[-1] or (args[0] == 1 and args[1][3] == 2):
            return None
        x2 = x.reshape(-1, w.shape[1])
        if x2.shape[0] > _cpu.MAX_NATIVE_ROWS:
            return None
        y = b.expand(x2.shape[0], -1).clone() if b is not None else x2.new_zeros((x2.shape[0], w.shape[0]))
        _cpu.addmm_(y, x2.contiguous(), args, None, False, *flags, weight=w)
        return y.view(*x.shape[:-1], w.shape[0])

    def _native_flags(self) -> _cpu.Flags:
        """The native kernels' flags of the running model call (read once per call), else read now."""
        flags = self.call_info.native
        return _cpu.call_flags() if flags is None else flags

    def _native_add(self, y: torch.Tensor, x: torch.Tensor, adapter: nn.Module) -> bool:
        """Add one adapter's delta for every row into ``y`` in place with the native CPU kernels, reading the
        resident form directly (decode-sized batches: at most :data:`._cpu.MAX_NATIVE_ROWS` token rows). False,
        with ``y`` untouched, where they do not apply (the torch path runs instead)."""
        flags = self._native_flags()
        if (not flags or x.dtype is not torch.float32 or y.dtype is not torch.float32 or not x.is_cpu or not y.is_cpu
                or not y.is_contiguous() or (torch.is_grad_enabled() and (x.requires_grad or y.requires_grad))):
            return False
        args = _native_args_of(adapter)
        if args is None:
            return False
        x2 = x.reshape(-1, args[1][-2] if self.fan_in_fan_out else args[1][-1])
        if x2.shape[0] > _cpu.MAX_NATIVE_ROWS:
            return False
        _cpu.addmm_(y.view(x2.shape[0], -1), x2.contiguous(), args, None, self.fan_in_fan_out, *flags)
        return True

    def _delta_sgmv(self, x: torch.Tensor, groups: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
        """Every row group's delta in one fused launch (Punica-style SGMV over adapter segments): the tokens of
        each group's batch rows are gathered into consecutive segments, and the result scattered back. The
        gather order and the segment table are built, checked and put on the device once per selection (kept on
        this layer), so a decode step launches its kernels without a host round trip."""
        x2 = x.reshape(x.shape[0], -1, self.in_features)
        tokens = x2.shape[1]
        key = (tuple((name, id(idx)) for name, idx in groups), tokens, x.shape[0], x.device)
        plans = self.__dict__.setdefault("_sgmv_plans", {})
        plan = plans.get(key)
        if plan is None:
            order, segs, start = [], [], 0
            for k, (_, idx) in enumerate(groups):
                rows = token_rows(idx.cpu(), tokens)
                order.append(rows)
                segs.append((start, start + rows.numel(), k))
                start += rows.numel()
            segments = torch.tensor(segs, dtype=torch.int32)
            kernels.check_segments(segments, x2.shape[0] * tokens, len(groups))
            if len(plans) >= 64:
                plans.clear()
            plan = plans[key] = (torch.cat(order).to(x.device), segments.to(x.device), [idx for _, idx in groups])
        perm, segments, _ = plan
        flat = x2.reshape(-1, self.in_features)
        mods = self._modules["adapters"]._modules  # type: ignore[union-attr]
        part = kernels.delta_matmul_segments(flat.index_select(0, perm), segments, [mods[n] for n, _ in groups],
                                             fused=True, checked=True)
        out = flat.new_zeros((flat.shape[0], self.out_features)).index_copy_(0, perm, part.to(flat.dtype))
        return out.reshape(*x.shape[:-1], self.out_features)

    def _mixed_with_biases(self, x: torch.Tensor, sel: tuple[tuple[str | None, torch.Tensor], ...]) -> torch.Tensor:
        """Mixed batch where some adapters changed the bias: ``x Wᵀ`` once, then each row group's own bias and delta."""
        w = self.base_layer.weight
        y = x @ w if self.fan_in_fan_out else nn.functional.linear(x, w)
        base_bias = self.base_layer.bias
        for name, idx in sel:
            bias = self.raw_bias.get(name, base_bias) if name is not None else base_bias
            has_delta = name is not None and name in self.adapters
            if bias is None and not has_delta:
                continue
            idx = idx.to(x.device)
            part = y.index_select(0, idx)
            if bias is not None:
                part = part + bias.to(y.dtype)
            if has_delta:
                part = part + self._delta(name, x.index_select(0, idx)).to(y.dtype)
            y = y.index_copy(0, idx, part)
        return y

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, active={self.active_adapter!r}, chunk_rows={self.chunk_rows}"


