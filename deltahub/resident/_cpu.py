"""CPU products of resident deltas straight from their resident form (the optional native kernels).

``deltahub/resident/_native.c`` (built at install when a C compiler is present) computes
``y[rows] += x[rows] @ Δ̂ᵀ`` from a codebook adapter's bitmap + 4-bit codes or a BitDelta adapter's
sign bits, without decoding ``Δ̂`` to a dense matrix: per 16 weights one code expansion and one
FMA per batch row (AVX-512 where the CPU has it, portable loops elsewhere), output rows split over
torch's own OpenMP threads (``torch.get_num_threads()``). For one codebook adapter on a plain float32
``nn.Linear`` the layer's whole product ``x @ (W + Δ̂)ᵀ`` runs in one pass over the base weight and the
resident form (``addmm_(..., weight=W)``): the rebuilt weight ``fp32(W + Δ̂)`` is formed in registers,
so one attached delta decodes at about the base's speed. The torch paths of :mod:`.layers` compute the
same products (up to the summation order's float rounding); this module is used when :func:`applies`
(float32 on CPU, no autograd) and the native module was built.

``DELTAHUB_NATIVE=0`` turns the native kernels off (the torch paths run); ``DELTAHUB_NATIVE_SIMD=0``
keeps them but on the portable loops (tests compare both).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..codecs._accel import native_enabled
from .kernels import cache_mode

try:
    from . import _native as _NATIVE  # type: ignore[attr-defined]
except ImportError:  # built without a compiler: the torch paths
    _NATIVE = None

#: At most this many batch rows go through the native product; larger batches (prefill) decode rows
#: densely (natively) and use torch's GEMM, which reuses each decoded weight across rows better
#: (measured crossover ~48 rows on 576x576 / 1536x576 DeltaDQ deltas).
MAX_NATIVE_ROWS = 32

_GRANULARITY = {"tensor": 0, "row": 1, "group": 2}


def available() -> bool:
    """Whether the native resident kernels are built and not turned off by ``DELTAHUB_NATIVE``."""
    return _NATIVE is not None and native_enabled()


def simd() -> bool:
    """Whether the AVX-512 paths run (built, supported by this CPU, not ``DELTAHUB_NATIVE_SIMD=0``)."""
    return (_NATIVE is not None and bool(_NATIVE.simd())
            and os.environ.get("DELTAHUB_NATIVE_SIMD", "1").strip().lower() not in ("0", "false", "no", "off"))


def applies(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether the native path can compute with ``x`` (and ``others``, e.g. the output it adds into):
    float32 on CPU, no autograd graph to record."""
    if not available() or x.dtype != torch.float32 or x.device.type != "cpu":
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in others)):
        return False
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in others)


#: What the native path needs from the environment, read once per model call (:func:`call_flags`):
#: ``(use_simd, threads)``, or ``()`` when the native kernels are off.
Flags = tuple[()] | tuple[bool, int]


def call_flags() -> Flags:
    """``(use_simd, threads)`` for the native kernels now, or ``()`` where they do not run (not built,
    ``DELTAHUB_NATIVE=0``, or a ``DELTAHUB_RESIDENT_CACHE`` mode other than ``none``, which asks for the
    torch paths with that cache). Reads the environment: resident models call it once per forward pass."""
    if not available() or cache_mode() != "none":
        return ()
    return simd(), torch.get_num_threads()


def _rows_arg(y: torch.Tensor, x: torch.Tensor, rows: torch.Tensor | None) -> tuple[int, int, torch.Tensor | None]:
    if x.dim() != 2 or y.dim() != 2 or not x.is_contiguous() or not y.is_contiguous():
        raise ValueError("resident kernel: x and y must be contiguous 2-d tensors")
    if rows is None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"resident kernel: {x.shape[0]} input rows for {y.shape[0]} output rows")
        return 0, x.shape[0], None
    if rows.dtype != torch.int64 or rows.device.type != "cpu" or not rows.is_contiguous():
        rows = rows.to(device="cpu", dtype=torch.int64).contiguous()
    return rows.data_ptr(), rows.numel(), rows


#: Native argument tuples: ``(kind, args)``, kind 0 = codebook (``cb_matmul``), 1 = BitDelta (``bd_matmul``).
NativeArgs = tuple[int, tuple[Any, ...]]


def codebook_args(nz: torch.Tensor, codes: torch.Tensor, row_ptr: torch.Tensor, codebook: torch.Tensor,
                  shape: tuple[int, int]) -> NativeArgs:
    """The kernel arguments of a codebook adapter's buffers (checked here once: dtypes, sizes, contiguity)."""
    R, C = shape
    if (nz.dtype != torch.uint8 or tuple(nz.shape) != (R, (C + 7) // 8) or codes.dtype != torch.uint8
            or row_ptr.dtype != torch.int64 or row_ptr.numel() != R + 1 or codebook.dtype != torch.float32
            or codebook.numel() != 16 or not all(t.is_contiguous() for t in (nz, codes, row_ptr, codebook))):
        raise ValueError(f"resident kernel: codebook buffers do not fit the delta {[R, C]}")
    return 0, (nz.data_ptr(), codes.data_ptr(), codes.numel(), row_ptr.data_ptr(), codebook.data_ptr(), R, C)


def bitdelta_args(sign: torch.Tensor, scale: torch.Tensor, granularity: str, group_size: int,
                  shape: tuple[int, int]) -> NativeArgs:
    """The kernel arguments of a BitDelta adapter's buffers (checked here once)."""
    R, C = shape
    if (sign.dtype != torch.uint8 or tuple(sign.shape) != (R, (C + 7) // 8) or scale.dtype != torch.float32
            or not sign.is_contiguous() or not scale.is_contiguous()):
        raise ValueError(f"resident kernel: BitDelta buffers do not fit the delta {[R, C]}")
    gcols = min(group_size, C) if granularity == "group" else C
    return 1, (sign.data_ptr(), scale.data_ptr(), scale.numel(), _GRANULARITY[granularity], max(gcols, 1), R, C)


def addmm_(y: torch.Tensor, x: torch.Tensor, native_args: NativeArgs, rows: torch.Tensor | None, transposed: bool,
           use_simd: bool, threads: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``y[rows] += x[rows] @ Δ̂ᵀ`` (``transposed``: ``@ Δ̂``, a delta stored ``[in, out]``) from an adapter's
    :meth:`native_args`; ``rows`` None: every row. With the base ``weight`` (float32 ``[out, in]`` contiguous, not
    transposed): ``y[rows] += x[rows] @ (W + Δ̂)ᵀ``, the rebuilt layer's product in one pass over ``W`` and the
    resident delta (codebook, or BitDelta with tensor / row scales on the AVX-512 path). The caller checked
    :func:`applies`. Returns ``y``."""
    assert _NATIVE is not None
    kind, args = native_args
    R, C = args[-2], args[-1]
    if x.shape[-1] != (R if transposed else C) or y.shape[-1] != (C if transposed else R):
        raise ValueError(f"resident kernel: x {list(x.shape)} / y {list(y.shape)} do not fit the delta {[R, C]}")
    extra: tuple[int, ...] = ()
    if weight is not None:
        if (transposed or weight.dtype != torch.float32 or weight.device.type != "cpu"
                or tuple(weight.shape) != (R, C) or not weight.is_contiguous()):
            raise ValueError(f"resident kernel: base weight {weight.dtype} {list(weight.shape)} does not fit the delta {[R, C]}")
        extra = (weight.data_ptr(), C, R)
    ptr, n, keep = _rows_arg(y, x, rows)
    if n and R and C:
        _, call = job(native_args, x.data_ptr(), x.shape[1], x.shape[0], ptr, n, y.data_ptr(), y.shape[1], y.shape[0],
                      transposed, use_simd, threads)
        (_NATIVE.cb_matmul if kind == 0 else _NATIVE.bd_matmul)(*call, *extra)
    del keep
    return y


def job(native_args: NativeArgs, x_ptr: int, x_cols: int, x_rows: int, rows_ptr: int, n: int, y_ptr: int, y_cols: int,
        y_rows: int, transposed: bool, use_simd: bool, threads: int) -> tuple[int, tuple[Any, ...]]:
    """``(kind, arguments)`` of one ``cb_matmul`` / ``bd_matmul`` call (for :func:`run_many`): ``x`` / ``y`` as
    address, columns, rows; ``rows_ptr`` / ``n`` the int64 batch-row indices (0: rows ``0..n-1``)."""
    kind, args = native_args
    return kind, (x_ptr, x_cols, x_rows, rows_ptr, n, y_ptr, y_cols, y_rows, *args, transposed, use_simd, threads)


def run_many(jobs: list[tuple[int, tuple[Any, ...]]], threads: int) -> None:
    """Several products of one layer (:func:`job`; a mixed batch's adapters) in one native call, one OpenMP team:
    for callers that checked the tensors once and keep the arguments (the C side checks every row index and
    buffer size again, and that the jobs' output sizes agree)."""
    assert _NATIVE is not None
    if jobs:
        _NATIVE.matmul_many(jobs, threads)


def try_addmm_(y: torch.Tensor, x: torch.Tensor, adapter: Any, rows: torch.Tensor | None = None,
               transposed: bool = False) -> bool:
    """:func:`addmm_` for one adapter when the native path applies (built, float32 on CPU, no autograd, cache mode
    ``none``, the adapter's buffers on the CPU); False, with ``y`` untouched, otherwise."""
    if not applies(x, y) or cache_mode() != "none":
        return False
    args = adapter.native_args()
    if args is None:
        return False
    addmm_(y, x, args, rows, transposed, simd(), torch.get_num_threads())
    return True


def codebook_addmm_(y: torch.Tensor, x: torch.Tensor, adapter: Any, rows: torch.Tensor | None = None,
                    transposed: bool = False) -> torch.Tensor:
    """``y[rows] += x[rows] @ Δ̂ᵀ`` for a :class:`~deltahub.resident.layers._CodebookAdapter` (see :func:`addmm_`)."""
    args = codebook_args(adapter.nz, adapter.codes, adapter.row_ptr, adapter.codebook, adapter.shape)
    return addmm_(y, x, args, rows, transposed, simd(), torch.get_num_threads())


def bitdelta_addmm_(y: torch.Tensor, x: torch.Tensor, adapter: Any, rows: torch.Tensor | None = None,
                    transposed: bool = False) -> torch.Tensor:
    """``y[rows] += x[rows] @ Δ̂ᵀ`` for a :class:`~deltahub.resident.layers._BitDeltaAdapter` (see :func:`addmm_`)."""
    args = bitdelta_args(adapter.sign, adapter.scale, adapter.granularity, adapter.group_size, adapter.shape)
    return addmm_(y, x, args, rows, transposed, simd(), torch.get_num_threads())


def codebook_decode(adapter: Any, r0: int, r1: int) -> torch.Tensor:
    """Rows ``r0:r1`` of a codebook adapter's delta as dense float32 ``[r1 - r0, in]``."""
    assert _NATIVE is not None
    R, C = adapter.shape
    out = torch.empty((r1 - r0, C), dtype=torch.float32)
    if r1 <= r0 or not C:
        return out
    _, (nz, codes, ncodes, row_ptr, book, _, _) = codebook_args(adapter.nz, adapter.codes, adapter.row_ptr,
                                                              adapter.codebook, adapter.shape)
    _NATIVE.cb_decode(nz, codes, ncodes, row_ptr, book, R, C, r0, r1, out.data_ptr(), simd())
    return out
