"""Matmul kernels for resident deltas: ``y = x @ Δ̂ᵀ`` from a delta's stored (or cached) form.

Pure functions over tensors (no modules), used by :mod:`deltahub.resident.layers`:

* :func:`binary_matmul`: BitDelta ``Δ̂ = scale ⊙ sign`` on any device, either unpacking the packed
  sign bits ``chunk_rows`` output rows at a time, or from a cached ±1 matrix
  (:func:`unpack_pm1_int8`, 1 byte per weight) converted to ``x``'s dtype chunk by chunk. Both give
  the same bits: the ±1 values are exact in every float dtype.
* :func:`decoded_matmul`: codecs without a kernel (DeltaDQ...): decode, optionally kept dense.
* :func:`delta_matmul_segments`: a mixed batch whose rows are sorted by adapter (SGMV-style
  segment table ``[start, end, adapter]``) in one call: on CUDA with Triton, one fused kernel for
  BitDelta adapters (sign bits unpacked in registers, per-row/group scale, per-segment adapter);
  otherwise one :meth:`delta_matmul` per segment. :class:`~deltahub.resident.layers.DeltaLinear`
  routes a mixed batch through it whenever :func:`fused_sgmv_applies` (CUDA, Triton, BitDelta).

``benchmarks/kernels.md`` has the measurements behind these choices.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from ..codecs._bits import unpack_pm1
from ..codecs.bitdelta import expand_scales, scale_shape
from ..errors import DeltaHubError


#: ``DELTAHUB_RESIDENT_CACHE`` values: what a resident adapter keeps besides its stored form.
#: ``none``: nothing (BitDelta unpacks its bits each call, other codecs decode each call unless
#: attached with ``cache_decoded``); ``int8``: BitDelta keeps its ±1 matrix as int8 (1 byte per
#: weight); ``dense``: every adapter keeps its decoded ``Δ̂`` in the input's dtype (as many bytes as
#: the base weight: fastest on CPU, the memory of a merged model).
CACHE_MODES = ("none", "int8", "dense")

#: Output rows of a ±1 matrix unpacked (or converted from int8) at once; the temporary holds
#: ``CHUNK_ROWS * in_features`` elements of ``x``'s dtype.
CHUNK_ROWS = 1024


class DeltaMatmul(Protocol):
    """What :func:`delta_matmul_segments` needs of an adapter."""

    shape: tuple[int, int]

    def delta_matmul(self, x: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor: ...


class ResidentCacheError(DeltaHubError, ValueError):
    """``DELTAHUB_RESIDENT_CACHE`` names no cache mode."""


def cache_mode() -> str:
    """The resident cache mode from ``DELTAHUB_RESIDENT_CACHE`` (default ``none``), validated."""
    mode = os.environ.get("DELTAHUB_RESIDENT_CACHE", "none").strip().lower() or "none"
    if mode not in CACHE_MODES:
        raise ResidentCacheError(f"DELTAHUB_RESIDENT_CACHE={mode!r} is not one of {', '.join(CACHE_MODES)}")
    return mode


def cached(cache: dict[Any, torch.Tensor], key: tuple[Any, ...], make: Any) -> torch.Tensor:
    """``cache[key]``, made by ``make()`` on first use. The cache holds one entry: another mode,
    dtype or device replaces it (the old tensor is freed before the new one is made)."""
    t = cache.get(key)
    if t is None:
        cache.clear()
        t = cache[key] = make()
    return t


# ---------------------------------------------------------------------------------------- BitDelta


def unpack_pm1_int8(sign: torch.Tensor, cols: int) -> torch.Tensor:
    """Packed sign bits uint8 ``[rows, ceil(cols/8)]`` -> int8 ``[rows, cols]`` of ±1 (bit 1 = +1),
    the cacheable form of :func:`binary_matmul` (8x the packed bytes, 1/4 of a float32 weight)."""
    out = torch.empty(sign.shape[0], cols, dtype=torch.int8, device=sign.device)
    for r0 in range(0, sign.shape[0], CHUNK_ROWS):
        out[r0:r0 + CHUNK_ROWS] = unpack_pm1(sign[r0:r0 + CHUNK_ROWS], cols, torch.float32).to(torch.int8)
    return out


def binary_matmul(x: torch.Tensor, sign: torch.Tensor, scale: torch.Tensor, granularity: str, group_size: int, *,
                  pm1: torch.Tensor | None = None, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """``x @ Δ̂ᵀ`` for BitDelta ``Δ̂ = scale ⊙ ±1`` and ``x`` ``[n, in]``, computed in ``x``'s dtype.

    ``sign`` is the packed ``[out, ceil(in/8)]`` uint8 matrix and ``scale`` the stored float32
    scales of ``granularity`` (``tensor``/``row``/``group``). With ``pm1`` (a cached ``[out, in]``
    ±1 matrix of any dtype, e.g. :func:`unpack_pm1_int8`) the bits are not unpacked again; the
    result is bit-identical either way.
    """
    rows = sign.shape[0]
    cols = x.shape[-1]
    dtype = x.dtype
    out = x.new_empty((x.shape[0], rows))
    for r0 in range(0, rows, chunk_rows):
        r1 = min(r0 + chunk_rows, rows)
        w = unpack_pm1(sign[r0:r1], cols, dtype) if pm1 is None else pm1[r0:r1].to(dtype)
        if granularity == "group":
            s = expand_scales(scale[r0:r1].to(dtype), r1 - r0, cols, "group", group_size)
            out[:, r0:r1] = x @ (w * s).T
        elif granularity == "row":
            out[:, r0:r1] = (x @ w.T) * scale[r0:r1].to(dtype)
        else:
            out[:, r0:r1] = x @ w.T
    if granularity == "tensor":
        out.mul_(scale[0].to(dtype))
    return out


def bitdelta_dense(sign: torch.Tensor, scale: torch.Tensor, cols: int, granularity: str, group_size: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """The decoded ``Δ̂ = scale ⊙ ±1`` ``[out, in]`` in ``dtype`` (the float32 product, rounded once)."""
    rows = sign.shape[0]
    s = expand_scales(scale.to(torch.float32), rows, cols, granularity, group_size)
    return (unpack_pm1(sign, cols, torch.float32) * s).to(dtype)


def bitdelta_matmul(x: torch.Tensor, sign: torch.Tensor, scale: torch.Tensor, granularity: str, group_size: int,
                    cache: dict[Any, torch.Tensor], chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """The resident BitDelta entry point: ``x @ Δ̂ᵀ`` by :func:`cache_mode` (``cache`` is the
    adapter's own dict, kept across calls). ``none`` and ``int8`` are bit-identical to each other;
    ``dense`` rounds ``Δ̂`` to ``x``'s dtype first (within float rounding of them)."""
    mode = cache_mode()
    cols = x.shape[-1]
    if mode == "dense":
        key = ("dense", x.dtype, x.device)
        d = cached(cache, key, lambda: bitdelta_dense(sign, scale, cols, granularity, group_size, x.dtype).to(x.device))
        return x @ d.T
    pm1 = None
    if mode == "int8":
        pm1 = cached(cache, ("int8", sign.device), lambda: unpack_pm1_int8(sign, cols))
    else:
        cache.clear()
    return binary_matmul(x, sign, scale, granularity, group_size, pm1=pm1, chunk_rows=chunk_rows)


def decoded_matmul(x: torch.Tensor, decode: Any, cache: dict[Any, torch.Tensor], keep: bool,
                   transposed: bool = False) -> torch.Tensor:
    """``x @ Δ̂ᵀ`` (``transposed``: ``x @ Δ̂``, a delta stored ``[in, out]``) for a codec without a matmul kernel:
    ``decode()`` gives float32 ``Δ̂``; it is kept in ``cache`` (in ``x``'s dtype, on ``x``'s device) when
    ``keep`` or :func:`cache_mode` is ``dense``."""
    if keep or cache_mode() == "dense":
        d = cached(cache, ("dense", x.dtype, x.device), lambda: decode().to(device=x.device, dtype=x.dtype))
    else:
        cache.clear()
        d = decode().to(device=x.device, dtype=x.dtype)
    return x @ d if transposed else x @ d.T


# ---------------------------------------------------------------------------------------- mixed batches (SGMV)


def sort_by_adapter(names: Sequence[str | None]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Rows grouped by adapter for :func:`delta_matmul_segments`: ``(perm, segments, keys)``.

    ``perm`` (int64) orders the rows by adapter in first-appearance order (stable within one);
    ``segments`` is int32 ``[S, 3]``, one ``(start, end, k)`` per adapter over the permuted rows,
    ``keys[k]`` its name. Rows named ``None`` (base only) come last and are in no segment.
    """
    keys: list[str] = []
    rows: dict[str | None, list[int]] = {}
    for i, n in enumerate(names):
        if n is not None and n not in rows:
            keys.append(n)
        rows.setdefault(n, []).append(i)
    order = [i for k in keys for i in rows[k]] + rows.get(None, [])
    segs, start = [], 0
    for k, name in enumerate(keys):
        segs.append((start, start + len(rows[name]), k))
        start += len(rows[name])
    return (torch.tensor(order, dtype=torch.int64), torch.tensor(segs, dtype=torch.int32).reshape(-1, 3), keys)


def check_segments(segments: torch.Tensor, n: int, num_adapters: int) -> list[tuple[int, int, int]]:
    """The segment table as tuples, refused unless every segment lies in ``[0, n]`` and names an adapter."""
    if segments.dim() != 2 or segments.shape[1] != 3:
        raise ValueError(f"segments must be [S, 3] (start, end, adapter), got {list(segments.shape)}")
    segs = [tuple(int(v) for v in row) for row in segments.tolist()]
    for s, e, a in segs:
        if not (0 <= s <= e <= n and 0 <= a < num_adapters):
            raise ValueError(f"segment ({s}, {e}, {a}) is outside {n} rows / {num_adapters} adapters")
    return segs  # type: ignore[return-value]


def delta_matmul_segments(x: torch.Tensor, segments: torch.Tensor, adapters: Sequence[DeltaMatmul], *,
                          fused: bool | None = None, checked: bool = False) -> torch.Tensor:
    """``y[r] = x[r] @ Δ̂_aᵀ`` for every row ``r`` of every segment ``(start, end, a)``; rows in no
    segment get 0. One fused Triton launch when ``x`` is on CUDA and :func:`fused_sgmv_applies`
    (``fused=True``: whenever the caller checked that, e.g. under Triton's interpreter); otherwise one
    ``adapter.delta_matmul`` per segment. ``checked``: the caller already passed ``segments`` through
    :func:`check_segments` (for the fused launch: no copy of the table back to the host)."""
    rows = adapters[0].shape[0] if adapters else 0
    segs = [] if checked else check_segments(segments, x.shape[0], len(adapters))
    if fused is None:
        fused = x.is_cuda and fused_sgmv_applies(x, adapters)
    if fused:
        segs_dev = segments.to(device=x.device, dtype=torch.int32)
        if _all_codebook(adapters):
            return codebook_sgmv(x, segs_dev, adapters)
        return bitdelta_sgmv(x, segs_dev, adapters)
    if checked:
        segs = check_segments(segments, x.shape[0], len(adapters))
    out = x.new_zeros((x.shape[0], rows))
    for s, e, a in segs:
        if e > s:
            out[s:e] = adapters[a].delta_matmul(x[s:e])
    return out


def fused_sgmv_applies(x: torch.Tensor, adapters: Sequence[Any]) -> bool:
    """Whether a mixed batch over ``adapters`` can run as one fused launch: x on CUDA (or Triton's CPU
    interpreter, ``TRITON_INTERPRET=1``, for tests), Triton installed, and every adapter BitDelta of one shape
    and one scale group width, or every adapter a codebook form (DeltaDQ, top-k ternary) of one shape."""
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    if not triton_available():
        return False
    return (_all_bitdelta(adapters) and len(_scale_widths(adapters)) == 1) or _all_codebook(adapters)


def _all_codebook(adapters: Sequence[Any]) -> bool:
    shapes = {tuple(a.shape) for a in adapters}
    return bool(adapters) and len(shapes) == 1 and all(hasattr(a, "row_ptr") and hasattr(a, "codes") for a in adapters)


def _scale_widths(adapters: Sequence[Any]) -> set[int]:
    """The column widths the BitDelta adapters' scales cover (one per row: the whole row)."""
    cols = adapters[0].shape[1]
    return {min(a.group_size, cols) if a.granularity == "group" else cols for a in adapters}


def _all_bitdelta(adapters: Sequence[Any]) -> bool:
    shapes = {tuple(a.shape) for a in adapters}
    return bool(adapters) and len(shapes) == 1 and all(getattr(a, "codec_name", None) == "bitdelta" for a in adapters)


def stack_bitdelta(adapters: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """BitDelta adapters of one shape as the fused kernel's operands: signs uint8 ``[A, out, in/8]``,
    float32 scales ``[A, out, G]`` (``G`` column groups; 1 for ``tensor``/``row``) and the group width."""
    rows, cols = adapters[0].shape
    widths = _scale_widths(adapters)
    if len(widths) != 1:
        raise ValueError(f"adapters mix scale group widths {sorted(widths)}; the fused kernel needs one")
    width = max(widths.pop(), 1)
    ngroups = (cols + width - 1) // width
    scales = [a.scale.to(torch.float32).reshape(-1, 1 if a.granularity != "group" else ngroups).expand(rows, ngroups)
              for a in adapters]
    return torch.stack([a.sign for a in adapters]), torch.stack(scales).contiguous(), width


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether Triton is installed (optional: the fused kernel needs it and CUDA, or its interpreter)."""
    return importlib.util.find_spec("triton") is not None


def binary_sgmv(x: torch.Tensor, segments: torch.Tensor, signs: torch.Tensor, scales: torch.Tensor, group: int,
                *, block_m: int | None = None, block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """The fused Triton kernel (needs Triton; CUDA tensors, or any under ``TRITON_INTERPRET=1``):
    ``y[r] = x[r] @ (scales[a] ⊙ ±1(signs[a]))ᵀ`` per segment ``(start, end, a)``, accumulated in
    float32 (float32 ``x``: IEEE products, no TF32; bf16 / fp16 ``x``: tensor-core products of ``x`` and the delta
    rounded to its dtype, as a 16-bit model's matmuls are) and returned in ``x``'s dtype; rows in no segment are 0."""
    n, cols = x.shape
    num_a, rows, nbytes = signs.shape
    if nbytes != (cols + 7) // 8 or tuple(scales.shape[:2]) != (num_a, rows) or block_k % 8:
        raise ValueError(f"signs {list(signs.shape)} / scales {list(scales.shape)} do not fit x {list(x.shape)}")
    signs, scales = signs.contiguous(), scales.to(torch.float32).contiguous()
    ngroups = scales.shape[2]
    table = [(signs[a].data_ptr(), scales[a].data_ptr(), ngroups, 1) for a in range(num_a)]
    return _launch_bitdelta(x, segments, table, rows, group, block_m, block_n, block_k)


def bitdelta_sgmv(x: torch.Tensor, segments: torch.Tensor, adapters: Sequence[Any], *, block_m: int | None = None,
                  block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """:func:`binary_sgmv` for BitDelta adapters of one shape and scale group width, read in place (an address
    table of their signs and scales with each one's scale strides: tensor, row or column-group scales), no
    stacked copy per call."""
    n, cols = x.shape
    rows = adapters[0].shape[0] if adapters else 0
    widths = _scale_widths(adapters) if adapters else {cols}
    if len(widths) != 1:
        raise ValueError(f"adapters mix scale group widths {sorted(widths)}; the fused kernel needs one")
    table = []
    for a in adapters:
        if tuple(a.shape) != (rows, cols) or a.sign.device != x.device or a.scale.device != x.device \
                or tuple(a.sign.shape) != (rows, (cols + 7) // 8) or not a.sign.is_contiguous() or not a.scale.is_contiguous():
            raise ValueError(f"BitDelta adapter {list(a.shape)} on {a.sign.device} does not fit x {list(x.shape)} on {x.device}")
        ngroups = scale_shape(rows, cols, a.granularity, a.group_size)
        s_row, s_group = {"tensor": (0, 0), "row": (1, 0)}.get(a.granularity, (ngroups[-1], 1))
        table.append((a.sign.data_ptr(), a.scale.data_ptr(), s_row, s_group))
    return _launch_bitdelta(x, segments, table, rows, max(widths.pop(), 1), block_m, block_n, block_k)


def _launch_bitdelta(x: torch.Tensor, segments: torch.Tensor, table: list[tuple[int, int, int, int]], rows: int,
                     group: int, block_m: int | None, block_n: int, block_k: int) -> torch.Tensor:
    n, cols = x.shape
    x = x.contiguous()
    y = torch.zeros((n, rows), dtype=torch.float32, device=x.device)
    if segments.shape[0] and rows and cols:
        import triton

        addrs = _address_table(x.device, tuple(table))
        grid = (segments.shape[0], triton.cdiv(rows, block_n))
        gemv = _compiled() and _decode_sized(n, segments)
        _sgmv_kernel()[grid](x, addrs, y, segments.contiguous(), rows, cols, (cols + 7) // 8, group,
                             BLOCK_M=block_m or (4 if gemv else 16), BLOCK_N=block_n, BLOCK_K=block_k,
                             LOW=x.dtype in (torch.bfloat16, torch.float16), GEMV=gemv)
    return y.to(x.dtype)


def codebook_sgmv(x: torch.Tensor, segments: torch.Tensor, adapters: Sequence[Any], *, block_m: int | None = None,
                  block_n: int = 32, block_k: int = 64, num_warps: int = 4) -> torch.Tensor:
    """The fused Triton kernel for codebook adapters (``_CodebookAdapter``: non-zero bitmap, 4-bit codes in
    row-major non-zero order, ``row_ptr``, 16-entry float32 codebook): ``y[r] = x[r] @ Δ̂_aᵀ`` per segment
    ``(start, end, a)``. Each ``[BLOCK_N, BLOCK_K]`` tile of ``Δ̂_a`` is decoded in registers (the bitmap's
    running count gives each non-zero's code index) and never written to memory; the adapters' buffers are
    read in place (their addresses in one table, as Triton's grouped GEMM does), not stacked. Accumulated in
    float32 (products as in :func:`binary_sgmv`), returned in ``x``'s dtype; rows in no segment are 0."""
    n, cols = x.shape
    rows = adapters[0].shape[0] if adapters else 0
    for a in adapters:
        if a.shape != (rows, cols) or a.nz.device != x.device:
            raise ValueError(f"codebook adapter {list(a.shape)} on {a.nz.device} does not fit x {list(x.shape)} on {x.device}")
    x = x.contiguous()
    y = torch.zeros((n, rows), dtype=torch.float32, device=x.device)
    if segments.shape[0] and rows and cols:
        import triton

        addrs = _address_table(x.device, tuple(a.buffer_addresses() for a in adapters))
        grid = (segments.shape[0], triton.cdiv(rows, block_n))
        compiled = _compiled()
        gemv = compiled and _decode_sized(n, segments)
        _codebook_kernel()[grid](x, addrs, y, segments.contiguous(), rows, cols, (cols + 7) // 8,
                                 BLOCK_M=block_m or (4 if gemv else 16), BLOCK_N=block_n, BLOCK_K=block_k,
                                 USE_SCAN=compiled, LOW=x.dtype in (torch.bfloat16, torch.float16), GEMV=gemv,
                                 num_warps=num_warps)
    return y.to(x.dtype)


def _decode_sized(n: int, segments: torch.Tensor) -> bool:
    """Whether the segments average at most 4 rows (decode steps): the kernels then sum fp32 products in registers
    instead of ``tl.dot``, whose 16-row minimum tile and operand layout shuffles (shared-memory bank conflicts,
    seen with Nsight Compute on an H200) dominate at so few rows."""
    return n <= 4 * max(int(segments.shape[0]), 1)


_KERNELS: dict[str, Any] = {}
#: Test hook: the compiled kernels' scan counting under the interpreter too (only where Triton was imported after
#: ``TRITON_INTERPRET=1`` was set, so that its standard library is interpretable: a fresh process).
_SCAN_IN_INTERPRETER = os.environ.get("DELTAHUB_TRITON_SCAN") == "1"
#: Device copies of adapters' buffer-address tables (codebook_sgmv, bitdelta_sgmv), by device and the table.
_ADDRESS_TABLES: dict[tuple[Any, ...], torch.Tensor] = {}


def _address_table(device: torch.device, table: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """``table`` (one row of addresses / strides per adapter) as an int64 tensor on ``device``, kept: keyed by its
    own values, so a kept table is always the right one, and a decode step makes no host copy."""
    addrs = _ADDRESS_TABLES.get((device, table))
    if addrs is None:
        if len(_ADDRESS_TABLES) >= 1024:
            _ADDRESS_TABLES.clear()
        addrs = _ADDRESS_TABLES[(device, table)] = torch.tensor(table, dtype=torch.int64, device=device)
    return addrs


def _compiled() -> bool:
    """Whether the kernels run compiled (not under Triton's interpreter; or the test hook asks for the compiled
    kernels' code paths there)."""
    return os.environ.get("TRITON_INTERPRET") != "1" or _SCAN_IN_INTERPRETER


def _jit_kernel(name: str, define: Any) -> Any:
    """A ``@triton.jit`` kernel, defined by ``define()`` on first use (importing Triton costs ~0.3 s; its
    interpreter is chosen at definition time from ``TRITON_INTERPRET``, hence one per value)."""
    key = f"{name}:{os.environ.get('TRITON_INTERPRET', '')}"
    kernel = _KERNELS.get(key)
    if kernel is None:
        kernel = _KERNELS[key] = define()
    return kernel


def _sgmv_kernel() -> Any:
    """The BitDelta SGMV kernel (:func:`binary_sgmv`)."""
    return _jit_kernel("binary", _define_sgmv_kernel)


def _define_sgmv_kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, addr_ptr, y_ptr, seg_ptr, N, K, NBYTES, GROUP,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, LOW: tl.constexpr,
               GEMV: tl.constexpr):
        # One (segment, block of BLOCK_N output columns): the adapter's sign bits for a
        # [BLOCK_N, BLOCK_K] tile are unpacked in registers, scaled, and dotted with the rows. The adapter's
        # buffers come from the address table: (signs, scales, scale stride per row, per column group).
        seg = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        start = tl.load(seg_ptr + seg * 3)
        end = tl.load(seg_ptr + seg * 3 + 1)
        a = tl.load(seg_ptr + seg * 3 + 2).to(tl.int64)
        sign_base = tl.load(addr_ptr + a * 4).to(tl.pointer_type(tl.uint8))
        scale_base = tl.load(addr_ptr + a * 4 + 1).to(tl.pointer_type(tl.float32))
        s_row = tl.load(addr_ptr + a * 4 + 2)
        s_group = tl.load(addr_ptr + a * 4 + 3)
        n_ok = offs_n < N
        for m0 in range(start, end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_ok = offs_m < end
            acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # (tl.zeros is a jit helper the interpreter may not patch)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < K
                xt = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                wk_ok = n_ok[:, None] & k_ok[None, :]
                byte = tl.load(sign_base + offs_n[:, None] * NBYTES + offs_k[None, :] // 8, mask=wk_ok, other=0)
                bit = (byte.to(tl.int32) >> (offs_k[None, :] % 8)) & 1
                s = tl.load(scale_base + offs_n[:, None] * s_row + (offs_k[None, :] // GROUP) * s_group, mask=wk_ok, other=0.0)
                w = tl.where(bit == 1, s, -s)  # [BLOCK_N, BLOCK_K] of the delta, never in memory
                if GEMV:  # decode-sized segments: fp32 products summed in registers (no operand shuffles)
                    acc += tl.sum(xt.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
                elif LOW:  # 16-bit x: tensor-core dot, fp32 sums
                    acc += tl.dot(xt, tl.trans(w.to(xt.dtype)))
                else:
                    acc += tl.dot(xt.to(tl.float32), tl.trans(w), input_precision="ieee")
            tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])

    return kernel


def _codebook_kernel() -> Any:
    """The codebook SGMV kernel (:func:`codebook_sgmv`)."""
    return _jit_kernel("codebook", _define_codebook_kernel)


def _define_codebook_kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, addr_ptr, y_ptr, seg_ptr, N, K, NBYTES,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_SCAN: tl.constexpr,
               LOW: tl.constexpr, GEMV: tl.constexpr):
        # One (segment, block of BLOCK_N output rows of the delta): per [BLOCK_N, BLOCK_K] tile, the bitmap's bits,
        # each non-zero's code index (row start + set bits before it: a running count plus an in-tile cumsum),
        # its nibble and codebook value, all in registers; then a dot with the segment's rows.
        seg = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        start = tl.load(seg_ptr + seg * 3)
        end = tl.load(seg_ptr + seg * 3 + 1)
        a = tl.load(seg_ptr + seg * 3 + 2).to(tl.int64)
        nz_base = tl.load(addr_ptr + a * 4).to(tl.pointer_type(tl.uint8))
        codes_base = tl.load(addr_ptr + a * 4 + 1).to(tl.pointer_type(tl.uint8))
        rp_base = tl.load(addr_ptr + a * 4 + 2).to(tl.pointer_type(tl.int64))
        book_base = tl.load(addr_ptr + a * 4 + 3).to(tl.pointer_type(tl.float32))
        n_ok = offs_n < N
        row_start = tl.load(rp_base + offs_n, mask=n_ok, other=0).to(tl.int32)  # < 2**31 (checked at the host)
        # USE_SCAN (compiled): counts by a row scan; else (Triton's interpreter) by exact float dots with 0/1
        # matrices (builtins only: the standard library's cumsum / sum are jit helpers that the interpreter cannot
        # call when Triton was imported before TRITON_INTERPRET=1). LOW: 16-bit x, tensor-core dots with fp32 sums.
        lane = tl.arange(0, BLOCK_K)
        upto = tl.where(lane[:, None] <= lane[None, :], 1.0, 0.0)  # [BLOCK_K, BLOCK_K]: inclusive prefix sums
        ones = tl.full((BLOCK_K, BLOCK_K), 1.0, tl.float32)  # every column: the row total
        for m0 in range(start, end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_ok = offs_m < end
            acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
            seen = row_start[:, None] + tl.full((BLOCK_N, BLOCK_K), 0, tl.int32)  # set bits before this tile
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < K
                xt = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                wk_ok = n_ok[:, None] & k_ok[None, :]
                byte = tl.load(nz_base + offs_n[:, None] * NBYTES + offs_k[None, :] // 8, mask=wk_ok, other=0)
                bit = (byte.to(tl.int32) >> (offs_k[None, :] % 8)) & 1
                bit = tl.where(wk_ok, bit, 0)
                if USE_SCAN:
                    before = tl.cumsum(bit, axis=1) - bit  # set bits left of each column
                    tile_total = tl.sum(bit, axis=1)[:, None]
                else:
                    bitf = bit.to(tl.float32)
                    before = (tl.dot(bitf, upto, input_precision="ieee") - bitf).to(tl.int32)  # exact small counts
                    tile_total = tl.dot(bitf, ones, input_precision="ieee").to(tl.int32)
                k = seen + before  # code index of each non-zero
                present = bit == 1
                cbyte = tl.load(codes_base + (k >> 1), mask=present, other=0)
                nib = (cbyte.to(tl.int32) >> ((k & 1) * 4)) & 15
                w = tl.load(book_base + nib, mask=present, other=0.0)  # [BLOCK_N, BLOCK_K] of the delta
                if GEMV:  # decode-sized segments: fp32 products summed in registers (no operand shuffles)
                    acc += tl.sum(xt.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
                elif LOW:
                    acc += tl.dot(xt, tl.trans(w.to(xt.dtype)))
                else:
                    acc += tl.dot(xt.to(tl.float32), tl.trans(w), input_precision="ieee")
                seen += tile_total
            tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])

    return kernel
