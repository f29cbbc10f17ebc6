"""BitDelta (arXiv 2402.10193): ``delta ≈ scale * sign(delta)``, one bit per weight plus scales.

Scales are the L2-optimal ``mean(|delta|)`` over a whole tensor (the paper's), each output
row, or each group of ``group_size`` consecutive columns of a row. Decoding is exact:
the decoded delta is ``+scale`` where the stored bit is 1 and ``-scale`` where it is 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from . import register_codec
from ._accel import HALF_KINDS, native
from ._bits import pack_signs, packed_cols, unpack_pm1, unpack_signs
from ._rng import map_blocks
from .base import (Codec, EncodeInput, Encoded, StoredSpec, check_range, expect_stored, matrix_view_shape,
                   param_choice, param_int)
from ..errors import CodecError, InvalidCodecParamsError

GRANULARITIES = ("tensor", "row", "group")
#: Elements per call of the native sign-add kernel (whole rows; the calls spread over the threads).
SIGN_BLOCK = 1 << 20


def scale_shape(rows: int, cols: int, granularity: str, group_size: int) -> tuple[int, ...]:
    """Shape of the stored float32 scale tensor."""
    if granularity == "tensor":
        return (1,)
    if granularity == "row":
        return (rows,)
    return (rows, (cols + group_size - 1) // group_size)


def bitdelta_scales(delta2d: torch.Tensor, granularity: str, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-optimal scales for ``sign(delta)`` (mean |delta| per tensor / row / column group) and group sizes."""
    l1 = torch.linalg.vector_norm
    rows, cols = delta2d.shape
    if granularity == "tensor":
        n = torch.tensor([float(rows * cols)], dtype=torch.float64)
        sums = l1(delta2d, 1, dtype=torch.float64).reshape(1)
    elif granularity == "row":
        n = torch.tensor([float(cols)], dtype=torch.float64)
        sums = l1(delta2d, 1, dim=1)
    else:
        ngroups = (cols + group_size - 1) // group_size
        pad = ngroups * group_size - cols
        padded = torch.nn.functional.pad(delta2d, (0, pad)) if pad else delta2d
        sums = l1(padded.reshape(rows, ngroups, group_size), 1, dim=2)
        n = torch.full((ngroups,), float(group_size), dtype=torch.float64)
        n[-1] = group_size - pad
    return (sums.to(torch.float64) / n).to(torch.float32), n


def expand_scales(scale: torch.Tensor, rows: int, cols: int, granularity: str, group_size: int) -> torch.Tensor:
    """Broadcastable float32 scale for a ``[rows, cols]`` matrix."""
    if granularity == "tensor":
        return scale.reshape(1, 1)
    if granularity == "row":
        return scale.reshape(rows, 1)
    # Gather (not repeat_interleave): O(rows * cols) whatever group_size, even one far above cols.
    return scale[:, torch.arange(cols, device=scale.device) // min(group_size, max(cols, 1))]


def sign_add_(target: torch.Tensor, sign: torch.Tensor, scale: torch.Tensor, rows: int, cols: int, stride: int,
              gcols: int) -> None:
    """``target[r, c] = dtype(float32(target[r, c]) + (bit(r, c) ? s : -s))`` in place by the native kernel, with
    ``s = scale[r * stride + c // gcols]`` (float32) and ``sign`` the packed bits ``[rows, ceil(cols / 8)]``; a block
    of rows per task on the caller's torch threads. ``target``: contiguous float32, bfloat16 or float16 of
    ``rows * cols`` elements; the caller checks that :func:`native` is built."""
    nat = native()
    half = HALF_KINDS[target.dtype]
    flat = (target.view(torch.int16) if half else target).view(rows, cols).numpy()  # 16-bit floats as their bits
    sign_np, scale_np = sign.contiguous().numpy(), scale.reshape(-1).numpy()
    step = max(1, SIGN_BLOCK // max(cols, 1))

    def block(r0: int, m: int) -> None:
        nat.sign_add(flat[r0:r0 + m], sign_np[r0:r0 + m], scale_np[r0 * stride:] if stride else scale_np, m, cols,
                     stride, gcols, half)

    map_blocks(block, [(r, min(step, rows - r)) for r in range(0, rows, step)])


@register_codec
class BitDelta(Codec):
    """1-bit sign of the delta, packed 8 per byte along the last axis, with float32 scales."""

    name = "bitdelta"
    delta_only = True
    default_params: dict[str, Any] = {"granularity": "tensor", "group_size": 128}

    def validate_params(self, params: dict[str, Any]) -> dict[str, Any]:
        p = super().validate_params(params)
        if p["granularity"] not in GRANULARITIES:
            raise InvalidCodecParamsError(
                f"codec 'bitdelta': granularity={p['granularity']!r} is not one of {', '.join(GRANULARITIES)}"
            )
        check_range(self.name, "group_size", p["group_size"], lo=1, integer=True)
        if p["granularity"] != "group":
            p.pop("group_size")
        return p

    def check_decode(self, params: dict[str, Any], stored: Mapping[str, StoredSpec],
                     shape: tuple[int, ...], dtype: torch.dtype) -> None:
        rows, cols = matrix_view_shape(shape)
        granularity = param_choice(self.name, params, "granularity", GRANULARITIES)
        g = 0
        if granularity == "group":
            # Any size >= 1 is valid (a group wider than the row is the whole row); decoding gathers
            # scales by column, so the size never drives an allocation.
            g = param_int(self.name, params, "group_size", 1, 2**63 - 1)
        expect_stored(self.name, stored, {
            "sign": (torch.uint8, (rows, packed_cols(cols))),
            "scale": (torch.float32, scale_shape(rows, cols, granularity, g)),
        })

    def encode(self, inp: EncodeInput, params: dict[str, Any]) -> Encoded:
        delta = inp.delta
        rows, cols = matrix_view_shape(delta.shape)
        d2 = delta.reshape(rows, cols)
        g = params.get("group_size", 0)
        scale, counts = bitdelta_scales(d2, params["granularity"], g)
        # A finite sum of |delta| means every element is finite: no separate NaN/Inf pass.
        if not bool(torch.isfinite(scale).all()):
            raise CodecError(f"tensor {inp.name!r}: the delta has NaN or Inf values; BitDelta cannot code them")
        sign = pack_signs(d2)
        # ||delta - s*sign||^2 = ||delta||^2 - n*s^2 per scale group (s = mean|delta| is L2-optimal), and
        # (s*sign - delta) . delta = s*sum|delta| - ||delta||^2 = n*s^2 - ||delta||^2: the allocation scores it undecoded.
        d_sq = inp.delta_sumsq()  # float64, once per input
        s64 = scale.to(torch.float64)
        captured = float((s64 * s64 * counts).sum())
        stats = {"delta_l2": d_sq**0.5, "error_l2": max(d_sq - captured, 0.0) ** 0.5, "error_dot": captured - d_sq}
        return Encoded({"sign": sign, "scale": scale}, dict(params), stats)

    def decode_delta(self, stored: dict[str, torch.Tensor], params: dict[str, Any], shape: tuple[int, ...]) -> torch.Tensor:
        rows, cols = matrix_view_shape(shape)
        g = params.get("group_size", 0)
        granularity = params["granularity"]
        sign, scale = stored["sign"], stored["scale"]
        if tuple(sign.shape) != (rows, packed_cols(cols)) or tuple(scale.shape) != scale_shape(rows, cols, granularity, g):
            raise CodecError(
                f"bitdelta: stored sign {list(sign.shape)} / scale {list(scale.shape)} do not fit tensor shape {list(shape)}"
            )
        s = expand_scales(scale.to(torch.float32), rows, cols, granularity, g)
        return unpack_signs(sign, cols, s).reshape(shape)

    def reconstruct(
        self,
        stored: dict[str, torch.Tensor],
        params: dict[str, Any],
        base: torch.Tensor | None,
        shape: tuple[int, ...],
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """``dtype(float32(base) + where(bit, s, -s))`` in one fused multiply-add (±1·s is exact)."""
        if base is None:
            raise CodecError("bitdelta needs the base tensor to rebuild")
        rows, cols = matrix_view_shape(shape)
        sign, scale = stored["sign"], stored["scale"]
        g = params.get("group_size", 0)
        if tuple(sign.shape) != (rows, packed_cols(cols)) or tuple(scale.shape) != scale_shape(rows, cols, params["granularity"], g):
            raise CodecError(
                f"bitdelta: stored sign {list(sign.shape)} / scale {list(scale.shape)} do not fit tensor shape {list(shape)}"
            )
        pm1 = unpack_pm1(sign, cols)
        s = expand_scales(scale.to(torch.float32), rows, cols, params["granularity"], g)
        out = torch.addcmul(base.reshape(rows, cols).to(torch.float32), pm1, s)
        return out.to(dtype).reshape(shape)

    def reconstruct_(self, stored: dict[str, torch.Tensor], params: dict[str, Any], base: torch.Tensor | None,
                     shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """:meth:`reconstruct` into the caller's ``base`` buffer by the native kernel (same bits): float32, or
        bfloat16 / float16 when the output has the base's dtype (the sum rounded once, in place)."""
        nat = native()
        half = HALF_KINDS.get(base.dtype) if base is not None and (base.dtype == dtype or base.dtype == torch.float32) else None
        if nat is None or base is None or half is None or not base.is_contiguous() or base.numel() != math.prod(shape):
            return self.reconstruct(stored, params, base, shape, dtype)
        rows, cols = matrix_view_shape(shape)
        sign, scale = stored["sign"], stored["scale"]
        granularity, g = params["granularity"], params.get("group_size", 0)
        if tuple(sign.shape) != (rows, packed_cols(cols)) or tuple(scale.shape) != scale_shape(rows, cols, granularity, g):
            raise CodecError(
                f"bitdelta: stored sign {list(sign.shape)} / scale {list(scale.shape)} do not fit tensor shape {list(shape)}"
            )
        scale = scale.to(torch.float32).contiguous()
        stride = 0 if granularity == "tensor" else (1 if granularity == "row" else scale.shape[1])
        gcols = max(cols, 1) if granularity != "group" else min(g, max(cols, 1))
        sign_add_(base, sign, scale, rows, cols, stride, gcols)
        return base.reshape(shape).to(dtype)

    def expected_nbytes(self, shape: tuple[int, ...], params: dict[str, Any]) -> int:
        rows, cols = matrix_view_shape(shape)
        n_scale = 1
        for s in scale_shape(rows, cols, params["granularity"], params.get("group_size", 0)):
            n_scale *= s
        return rows * packed_cols(cols) + 4 * n_scale
