"""Top-k ternary (ComPEFT-like, arXiv 2311.13171): keep the largest-magnitude fraction of the delta,
store only its signs and one scale per tensor.

The ``K = round(density * numel)`` entries of largest |delta| are kept (ties: lower row-major
index first). The mask is stored as the smaller of a packed bitmap and zstd'ed delta-coded indices
(``_masks``); the kept signs are packed one bit each in row-major order; the scale is the
L2-optimal ``mean(|delta|)`` over the kept entries (ComPEFT tunes ``alpha * std`` on validation
data instead; with no validation data the least-squares scale is the principled choice).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from . import register_codec
from ._bits import pack_bits, packed_cols, unpack_bits
from ._masks import MASK_ENCODINGS, bitmap_nbytes, decode_mask, encode_mask
from .base import (Codec, EncodeInput, Encoded, StoredSpec, check_range, expect_stored, matrix_view_shape,
                   param_choice, param_float)
from ..errors import CodecError, InvalidCodecParamsError


def kept_count(density: float, numel: int) -> int:
    """``K = floor(density * numel + 0.5)`` in IEEE-754 double."""
    return int(density * numel + 0.5)


def topk_mask(delta: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` largest |delta| (flat), ties broken by lower index."""
    a = delta.reshape(-1).abs()
    n = a.numel()
    mask = torch.zeros(n, dtype=torch.bool)
    if k <= 0:
        return mask.view(delta.shape)
    if k >= n:
        return torch.ones_like(mask).view(delta.shape)
    thr = torch.kthvalue(a, n - k + 1).values
    mask = a > thr
    need = k - int(mask.sum())
    if need > 0:
        ties = (a == thr).nonzero().squeeze(1)[:need]
        mask[ties] = True
    return mask.view(delta.shape)


@register_codec
class TopkTernary(Codec):
    """Magnitude top-k mask (bitmap or indices) + sign bits + one float32 scale per tensor."""

    name = "topk-ternary"
    delta_only = True
    default_params: dict[str, Any] = {"density": 0.1, "mask_encoding": "auto"}

    def validate_params(self, params: dict[str, Any]) -> dict[str, Any]:
        m = super().validate_params(params)
        check_range(self.name, "density", m["density"], lo=0.0, hi=1.0, lo_open=True)
        if m["mask_encoding"] not in ("auto", *MASK_ENCODINGS):
            raise InvalidCodecParamsError(
                f"codec 'topk-ternary': mask_encoding={m['mask_encoding']!r} is not one of auto, {', '.join(MASK_ENCODINGS)}")
        return m

    def encode(self, inp: EncodeInput, params: dict[str, Any]) -> Encoded:
        delta = inp.delta
        if not torch.isfinite(delta).all():
            raise CodecError(f"tensor {inp.name!r}: the delta has NaN or Inf values; topk-ternary cannot code them")
        rows, cols = matrix_view_shape(delta.shape)
        d2 = delta.reshape(rows, cols)
        k = kept_count(params["density"], d2.numel())
        mask = topk_mask(d2, k)
        kept = d2[mask]
        scale = kept.abs().mean(dtype=torch.float64).to(torch.float32).reshape(1) if k else torch.zeros(1)
        encoding, stored_mask = encode_mask(mask, params["mask_encoding"])
        sign = pack_bits((kept >= 0).reshape(1, -1)).reshape(-1)
        out = {"density": params["density"], "mask_encoding": encoding}
        return Encoded({"mask": stored_mask, "sign": sign, "scale": scale}, out)

    def check_decode(self, params: dict[str, Any], stored: Mapping[str, StoredSpec],
                     shape: tuple[int, ...], dtype: torch.dtype) -> None:
        rows, cols = matrix_view_shape(shape)
        density = param_float(self.name, params, "density", 0.0, 1.0, lo_open=True)
        encoding = param_choice(self.name, params, "mask_encoding", MASK_ENCODINGS)
        k = kept_count(density, rows * cols)
        if encoding == "bitmap":
            mask: tuple[torch.dtype, tuple[int, ...] | int] = (torch.uint8, (rows, packed_cols(cols)))
        else:
            if rows * cols >= 2**32:
                raise InvalidCodecParamsError(f"codec 'topk-ternary': index-coded masks need fewer than 2^32 elements, "
                                              f"the tensor has {rows * cols}")
            # One zstd frame (any length within zstd's worst-case expansion of its content); the content,
            # 4 bytes per index, is bounded by 4 * numel before decompressing.
            mask = (torch.uint8, 8 * rows * cols + 1024)
        expect_stored(self.name, stored, {"mask": mask, "sign": (torch.uint8, (packed_cols(k),)),
                                          "scale": (torch.float32, (1,))})

    def decode_delta(self, stored: dict[str, torch.Tensor], params: dict[str, Any], shape: tuple[int, ...]) -> torch.Tensor:
        rows, cols = matrix_view_shape(shape)
        mask = decode_mask(params["mask_encoding"], stored["mask"], rows, cols)
        k = int(mask.sum())
        if k != kept_count(params["density"], rows * cols):
            raise CodecError(f"topk-ternary: the mask keeps {k} elements, density {params['density']} means "
                             f"{kept_count(params['density'], rows * cols)}")
        sign, scale = stored["sign"], stored["scale"]
        if sign.dtype != torch.uint8 or tuple(sign.shape) != (packed_cols(k),) or tuple(scale.shape) != (1,):
            raise CodecError(f"topk-ternary: sign {list(sign.shape)} / scale {list(scale.shape)} do not fit {k} kept elements")
        s = scale.to(torch.float32).reshape(())
        bits = unpack_bits(sign.reshape(1, -1), k).reshape(-1)
        out = torch.zeros(rows, cols, dtype=torch.float32)
        out[mask] = torch.where(bits, s, -s)
        return out.reshape(shape)

    def expected_nbytes(self, shape: tuple[int, ...], params: dict[str, Any]) -> int | None:
        """``rows * ceil(cols / 8) + ceil(K / 8) + 4`` for a bitmap mask; None when indices may be chosen."""
        if params["mask_encoding"] != "bitmap":
            return None
        rows, cols = matrix_view_shape(shape)
        return bitmap_nbytes(rows, cols) + packed_cols(kept_count(params["density"], rows * cols)) + 4
