"""Mixed-precision low rank (Delta-CoMe, arXiv 2406.08903): quantized singular vectors, more bits
for larger singular values.

The delta's top ``R`` singular triplets are split into bands of consecutive triplets, largest ``σ``
first, e.g. ``[[2, 8], [8, 3], [36, 2]]`` (2 pairs of 8-bit vectors, then 8 of 3-bit, then 36 of
2-bit). The error a quantized pair adds to the delta is about ``σ_k`` times the vectors' own
quantization error, so precision is spent where ``σ`` is large, and a long tail of cheap 2-bit
vectors captures far more energy than the few fp16 ones the same bytes buy (plain ``lowrank``).

Each band's ``U`` columns (as one run of values, vector after vector) and ``Vh`` rows are quantized
with format_spec.md 3.7's ``uniform`` layout (asymmetric, one float16 ``(min, step)`` per ``qgroup``
values, a float32 norm per run); ``S`` stays float32. Encoder (informative): ``Vh`` is quantized
first, then ``U`` is refitted by least squares to the quantized ``Vh`` (``U·diag(S) = Δ Vqᵀ (Vq Vqᵀ)⁻¹``)
and quantized, so ``U`` absorbs part of ``Vh``'s quantization error (the "V then U" order of
Delta-CoMe's GPTQ step, done in closed form without calibration data).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from . import register_codec
from ._quant import dequantize_uniform, num_groups, pack_codes, packed_nbytes, quantize_uniform, unpack_codes
from ._svd import delta_svd
from .base import Codec, EncodeInput, Encoded, StoredSpec, check_range, expect_stored, matrix_view_shape, param_int
from .lowrank import check_finite, low_rank_product, reject_unknown
from ..errors import CodecError, InvalidCodecParamsError

#: Presets named by the fp16 ``lowrank`` rank whose bytes they match (qgroup 128 overheads included, per
#: unit of ``rows + cols``): ``E/4`` 8-bit pairs, ``E`` 3-bit pairs and ``4.5·E`` 2-bit pairs for ``rE``.
PRESETS: dict[str, dict[str, Any]] = {
    "r4": {"bands": [[1, 8], [4, 3], [18, 2]]},
    "r8": {"bands": [[2, 8], [8, 3], [36, 2]]},
    "r16": {"bands": [[4, 8], [16, 3], [72, 2]]},
    "r32": {"bands": [[8, 8], [32, 3], [144, 2]]},
}
DEFAULT_QGROUP = 128
#: Ridge (relative to the mean diagonal) of the Gram matrix in the encoder's least-squares refit of ``U``.
REFIT_RIDGE = 1e-6


def fit_bands(bands: list[list[int]], limit: int) -> list[list[int]]:
    """``bands`` cut to at most ``limit`` triplets in all (later bands shrink or go first)."""
    out: list[list[int]] = []
    left = limit
    for n, k in bands:
        if left <= 0:
            break
        out.append([min(n, left), k])
        left -= out[-1][0]
    return out


def pieces(bands: list[list[int]], rows: int, cols: int) -> list[tuple[int, int, int]]:
    """``(first triplet, values, bits)`` of each quantized run, in stored order: band 0's ``U`` then its ``Vh``, ..."""
    out, start = [], 0
    for n, k in bands:
        out += [(start, n * rows, k), (start, n * cols, k)]
        start += n
    return out


def _check_bands(codec: str, bands: Any, limit: int | None) -> list[list[int]]:
    """``bands`` as a list of ``[count >= 1, bits in 1..8]`` pairs (refusing bools, floats, other shapes)."""
    if not isinstance(bands, list) or not bands:
        raise InvalidCodecParamsError(f"codec {codec!r}: bands must be a non-empty list of [count, bits] pairs")
    out = []
    for b in bands:
        if not isinstance(b, list) or len(b) != 2:
            raise InvalidCodecParamsError(f"codec {codec!r}: band {b!r} is not a [count, bits] pair")
        n = param_int(codec, {"count": b[0]}, "count", 1, limit if limit is not None else 2**63 - 1)
        out.append([n, param_int(codec, {"bits": b[1]}, "bits", 1, 8)])
    total = sum(n for n, _ in out)
    if limit is not None and total > limit:
        raise InvalidCodecParamsError(f"codec {codec!r}: bands hold {total} singular triplets, more than the {limit} "
                                      "of the matrix")
    return out


@register_codec
class LowRankMP(Codec):
    """Singular vectors quantized band by band (``uniform`` 3.7), float32 singular values."""

    name = "lowrank-mp"
    delta_only = True
    whole_matrix = True
    presets = PRESETS
    default_params: dict[str, Any] = {"preset": "r8", "bands": None, "qgroup": DEFAULT_QGROUP}

    def validate_params(self, params: dict[str, Any]) -> dict[str, Any]:
        m = super().validate_params(params)
        preset = m.pop("preset")
        if preset is not None:
            if preset not in PRESETS:
                raise InvalidCodecParamsError(f"codec 'lowrank-mp': unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
            if m["bands"] is None:
                m["bands"] = [list(b) for b in PRESETS[preset]["bands"]]
        if m["bands"] is None:
            raise InvalidCodecParamsError("codec 'lowrank-mp': give a preset or bands")
        m["bands"] = _check_bands(self.name, m["bands"], None)
        check_range(self.name, "qgroup", m["qgroup"], lo=1, integer=True)
        return m

    def check_decode(self, params: dict[str, Any], stored: Mapping[str, StoredSpec],
                     shape: tuple[int, ...], dtype: torch.dtype) -> None:
        rows, cols = matrix_view_shape(shape)
        reject_unknown(self.name, params, ("bands", "qgroup"))
        bands = _check_bands(self.name, params.get("bands"), min(rows, cols))
        q = param_int(self.name, params, "qgroup", 1, 2**63 - 1)
        expect_stored(self.name, stored, _stored_specs(bands, q, rows, cols))

    def encode(self, inp: EncodeInput, params: dict[str, Any]) -> Encoded:
        d2 = check_finite(inp, self.name)
        rows, cols = d2.shape
        bands = fit_bands(params["bands"], min(rows, cols))
        if not bands:
            raise CodecError(f"tensor {inp.name!r}: an empty matrix has no singular vectors for lowrank-mp")
        q = params["qgroup"]
        u, s, vh = delta_svd(inp, sum(n for n, _ in bands))
        vq, v_parts = _quantize_runs(vh, bands, q, cols)
        ut, u_parts = _quantize_runs(_refit_u(d2, s, vq, u).T, bands, q, rows)
        codes, mins, steps, norms = [], [], [], []
        for (uc, um, us, un), (vc, vm, vs, vn) in zip(u_parts, v_parts):
            codes += [uc, vc]
            mins += [um, vm]
            steps += [us, vs]
            norms += [un, vn]
        tensors = {"s": s.to(torch.float32).contiguous(), "codes": torch.cat(codes), "qmin": torch.cat(mins),
                   "qstep": torch.cat(steps), "norm": torch.cat(norms)}
        return Encoded(tensors, {"bands": bands, "qgroup": q})

    def decode_delta(self, stored: dict[str, torch.Tensor], params: dict[str, Any], shape: tuple[int, ...]) -> torch.Tensor:
        return low_rank_product(*self.factors(stored, params, shape)).reshape(shape)

    def factors(self, stored: dict[str, torch.Tensor], params: dict[str, Any], shape: tuple[int, ...]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The dequantized ``(u, s, vh)`` whose :func:`low_rank_product` is :meth:`decode_delta`."""
        rows, cols = matrix_view_shape(shape)
        bands, q = params["bands"], params["qgroup"]
        for role, (dtype, want) in _stored_specs(bands, q, rows, cols).items():
            t = stored[role]
            if t.dtype != dtype or tuple(t.shape) != want:
                raise CodecError(f"lowrank-mp: stored {role!r} is {t.dtype} {list(t.shape)}, expected {list(want)}")
        runs = _dequantize_runs(stored, bands, q, rows, cols)
        u = torch.cat([runs[2 * i].reshape(n, rows) for i, (n, _) in enumerate(bands)]).T
        vh = torch.cat([runs[2 * i + 1].reshape(n, cols) for i, (n, _) in enumerate(bands)])
        return u, stored["s"], vh

    def svd_rank(self, params: Mapping[str, Any]) -> int:
        return sum(int(n) for n, _ in params["bands"])

    def expected_nbytes(self, shape: tuple[int, ...], params: dict[str, Any]) -> int | None:
        rows, cols = matrix_view_shape(shape)
        bands = fit_bands(params["bands"], min(rows, cols))
        total = 0
        for dtype, shp in _stored_specs(bands, params["qgroup"], rows, cols).values():
            total += dtype.itemsize * (shp[0] if shp else 1)
        return total


def _stored_specs(bands: list[list[int]], q: int, rows: int, cols: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Exact dtype and shape of every stored role (all 1-D)."""
    runs = pieces(bands, rows, cols)
    groups = sum(num_groups(n, q) for _, n, _ in runs)
    return {"s": (torch.float32, (sum(n for n, _ in bands),)),
            "codes": (torch.uint8, (sum(packed_nbytes(n, k) for _, n, k in runs),)),
            "qmin": (torch.float16, (groups,)), "qstep": (torch.float16, (groups,)),
            "norm": (torch.float32, (len(runs),))}


def _quantize_runs(vectors: torch.Tensor, bands: list[list[int]], q: int, length: int
                   ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Quantize ``vectors`` ``[R, length]`` band by band: the dequantized float32 vectors and each band's
    stored ``(packed codes, qmin, qstep, norm)``."""
    out, deq, start = [], [], 0
    for n, k in bands:
        uq = quantize_uniform(vectors[start:start + n].reshape(-1), k, q)
        out.append((pack_codes(uq.codes, k), uq.mins, uq.steps, uq.norm))
        deq.append(dequantize_uniform(uq.codes, uq.mins, uq.steps, uq.norm, q).reshape(n, length))
        start += n
    return torch.cat(deq), out


def _refit_u(d2: torch.Tensor, s: torch.Tensor, vq: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Least-squares ``U`` for the quantized ``Vh`` (``U·diag(S) = Δ Vqᵀ (Vq Vqᵀ + λI)⁻¹``); ``u`` where that fails."""
    gram = (vq @ vq.T).to(torch.float64)
    ridge = REFIT_RIDGE * float(gram.diagonal().mean()) if gram.numel() else 0.0
    gram += ridge * torch.eye(gram.shape[0], dtype=torch.float64)
    rhs = (d2.to(torch.float64) @ vq.T.to(torch.float64))
    try:
        us = torch.linalg.solve(gram, rhs.T).T
    except RuntimeError:
        return u
    safe = s.to(torch.float64).clamp(min=torch.finfo(torch.float32).tiny)
    refit = (us / safe).to(torch.float32)
    ok = torch.isfinite(refit).all(0) & (s > 0)
    return torch.where(ok.reshape(1, -1), refit, u)


def _dequantize_runs(stored: Mapping[str, torch.Tensor], bands: list[list[int]], q: int, rows: int, cols: int
                     ) -> list[torch.Tensor]:
    """Every run's float32 values (3.7 ``uniform``), in stored order."""
    out, byte, group = [], 0, 0
    for i, (_, n, k) in enumerate(pieces(bands, rows, cols)):
        nb, g = packed_nbytes(n, k), num_groups(n, q)
        codes = unpack_codes(stored["codes"][byte:byte + nb].contiguous(), n, k)
        out.append(dequantize_uniform(codes, stored["qmin"][group:group + g], stored["qstep"][group:group + g],
                                      stored["norm"][i:i + 1], q))
        byte, group = byte + nb, group + g
    return out
