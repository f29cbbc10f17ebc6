"""Low rank: ``delta ≈ U · diag(S) · Vh``, the top ``rank`` singular triplets of the delta's matrix view.

The best rank-``r`` approximation in the Frobenius norm (Eckart-Young): its squared error is the
energy of the discarded singular values, ``Σ_(k≥r) σ_k²``. ``U`` and ``Vh`` are stored in float16 (or
bfloat16; their entries are those of unit vectors, so float16's range is never a concern) and ``S``
in float32, ``(rows + cols) · 2 · r + 4 · r`` bytes. It wins when the fine-tune moved the matrix
along few directions (a LoRA-like delta); a full fine-tune's delta usually has a flat spectrum.

Decoding is ``(float32(U) · S) @ float32(Vh)``, a float32 matrix product: the spec
(format_spec.md 4.8) fixes every rounding except the summation order of that product, which BLAS
libraries choose, and bounds the difference. :func:`low_rank_product` is the one implementation,
shared by ``lowrank-mp`` and ``lowrank-residual``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from . import register_codec
from ._svd import delta_svd
from .base import Codec, EncodeInput, Encoded, StoredSpec, check_range, expect_stored, matrix_view_shape, param_choice, param_int
from ..errors import CodecError, InvalidCodecParamsError

#: Stored dtype of the singular vectors, by the name recorded in ``params["dtype"]``.
FACTOR_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def low_rank_product(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """``(float32(u) · s) @ float32(vh)``: ``u`` ``[rows, r]`` scaled column-wise (one rounding per
    element), then one float32 matrix product (format_spec.md 4.8; zeros when ``r = 0``)."""
    a = u.to(torch.float32) * s.to(torch.float32).reshape(1, -1)
    return a @ vh.to(torch.float32)


def check_finite(inp: EncodeInput, codec: str) -> torch.Tensor:
    """The delta's 2-D view, refusing NaN/Inf (an SVD of them is garbage)."""
    delta = inp.delta
    rows, cols = matrix_view_shape(delta.shape)
    if not math.isfinite(float(delta.sum(dtype=torch.float64))):  # any NaN/Inf shows in a float64 sum
        raise CodecError(f"tensor {inp.name!r}: the delta has NaN or Inf values; {codec} cannot code them")
    return delta.reshape(rows, cols)


def check_rank(codec: str, rank: Any) -> int:
    """A writer's ``rank``: an integer >= 1 (it records ``min(rank, rows, cols)``)."""
    check_range(codec, "rank", rank, lo=1, integer=True)
    return int(rank)


def factor_specs(rows: int, cols: int, r: int, dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Stored roles ``u``, ``s``, ``vh`` of a rank-``r`` factorisation."""
    return {"u": (dtype, (rows, r)), "s": (torch.float32, (r,)), "vh": (dtype, (r, cols))}


def encode_factors(inp: EncodeInput, rank: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The top-``rank`` triplets as stored tensors (``rank`` already clipped to the matrix)."""
    u, s, vh = delta_svd(inp, rank) if rank else (torch.zeros(0, 0), torch.zeros(0), torch.zeros(0, 0))
    rows, cols = matrix_view_shape(inp.delta.shape)
    return {"u": u.to(dtype).reshape(rows, rank).contiguous(), "s": s.to(torch.float32).reshape(rank).contiguous(),
            "vh": vh.to(dtype).reshape(rank, cols).contiguous()}


def decode_factors(codec: str, stored: Mapping[str, torch.Tensor], rows: int, cols: int, r: int) -> torch.Tensor:
    """The decoded low-rank delta ``[rows, cols]`` of stored ``u``, ``s``, ``vh`` (shapes re-checked)."""
    return low_rank_product(*checked_factors(codec, stored, rows, cols, r))


def checked_factors(codec: str, stored: Mapping[str, torch.Tensor], rows: int, cols: int, r: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stored ``u``, ``s``, ``vh`` after checking their shapes against rank ``r`` and the matrix."""
    u, s, vh = stored["u"], stored["s"], stored["vh"]
    if tuple(u.shape) != (rows, r) or tuple(s.shape) != (r,) or tuple(vh.shape) != (r, cols):
        raise CodecError(f"{codec}: stored u {list(u.shape)} / s {list(s.shape)} / vh {list(vh.shape)} do not fit "
                         f"rank {r} and matrix [{rows}, {cols}]")
    return u, s, vh


def read_rank(codec: str, params: Mapping[str, Any], rows: int, cols: int) -> int:
    """An untrusted recorded ``rank``: an integer in ``[0, min(rows, cols)]`` (and no key but ``rank``, ``dtype``)."""
    reject_unknown(codec, params, ("rank", "dtype"))
    return param_int(codec, params, "rank", 0, min(rows, cols))


def reject_unknown(codec: str, params: Mapping[str, Any], keys: tuple[str, ...]) -> None:
    """Refuse recorded params with keys other than ``keys`` (a reader must not guess what they mean)."""
    unknown = set(params) - set(keys)
    if unknown:
        raise InvalidCodecParamsError(f"codec {codec!r}: unknown parameter(s) {sorted(unknown)}; it records {list(keys)}")


@register_codec
class LowRank(Codec):
    """Top-``rank`` SVD factors of the delta, float16/bfloat16 singular vectors and float32 singular values."""

    name = "lowrank"
    delta_only = True
    whole_matrix = True
    default_params: dict[str, Any] = {"rank": 16, "dtype": "float16"}

    def validate_params(self, params: dict[str, Any]) -> dict[str, Any]:
        p = super().validate_params(params)
        check_rank(self.name, p["rank"])
        if p["dtype"] not in FACTOR_DTYPES:
            raise InvalidCodecParamsError(f"codec {self.name!r}: dtype={p['dtype']!r} is not one of {', '.join(FACTOR_DTYPES)}")
        return p

    def check_decode(self, params: dict[str, Any], stored: Mapping[str, StoredSpec],
                     shape: tuple[int, ...], dtype: torch.dtype) -> None:
        rows, cols = matrix_view_shape(shape)
        r = read_rank(self.name, params, rows, cols)
        fdtype = FACTOR_DTYPES[param_choice(self.name, params, "dtype", tuple(FACTOR_DTYPES))]
        expect_stored(self.name, stored, factor_specs(rows, cols, r, fdtype))

    def encode(self, inp: EncodeInput, params: dict[str, Any]) -> Encoded:
        d2 = check_finite(inp, self.name)
        rows, cols = d2.shape
        r = min(params["rank"], rows, cols)
        tensors = encode_factors(inp, r, FACTOR_DTYPES[params["dtype"]])
        return Encoded(tensors, {**params, "rank": r})

    def decode_delta(self, stored: dict[str, torch.Tensor], params: dict[str, Any], shape: tuple[int, ...]) -> torch.Tensor:
        rows, cols = matrix_view_shape(shape)
        return decode_factors(self.name, stored, rows, cols, params["rank"]).reshape(shape)

    def svd_rank(self, params: Mapping[str, Any]) -> int:
        return int(params["rank"])

    def factors(self, stored: dict[str, torch.Tensor], params: dict[str, Any], shape: tuple[int, ...]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(u, s, vh)`` whose :func:`low_rank_product` is :meth:`decode_delta` (resident mode multiplies by them directly)."""
        rows, cols = matrix_view_shape(shape)
        return checked_factors(self.name, stored, rows, cols, params["rank"])

    def expected_nbytes(self, shape: tuple[int, ...], params: dict[str, Any]) -> int:
        rows, cols = matrix_view_shape(shape)
        r = min(params["rank"], rows, cols)
        return r * (rows + cols) * FACTOR_DTYPES[params["dtype"]].itemsize + 4 * r
