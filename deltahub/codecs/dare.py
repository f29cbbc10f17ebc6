"""DARE (arXiv 2311.03099, "Language Models are Super Mario"): random drop and rescale.

Every element of the delta is dropped independently with probability ``p`` (a Bernoulli mask
regenerated from ``(seed, stream)`` by ``_rng.keep_mask``, so it costs zero bytes) and the kept
ones are rescaled by ``1 / (1 - p)``. The kept values are stored unquantized as float16 divided
by a per-tensor float32 ``norm`` (their largest magnitude), so that deltas far below float16's
normal range (~6e-5) keep 11 significant bits; ``dtype="bfloat16"`` trades 3 of them for range.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from . import register_codec
from ._rng import check_seed, keep_mask, name_stream
from .base import (Codec, EncodeInput, Encoded, StoredSpec, check_range, expect_stored, param_choice, param_float, param_int)
from ..errors import CodecError, InvalidCodecParamsError

VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@register_codec
class Dare(Codec):
    """Bernoulli drop-and-rescale with a seeded (zero-byte) mask and 16-bit kept values."""

    name = "dare"
    delta_only = True
    default_params: dict[str, Any] = {"p": 0.9, "seed": 0, "stream": None, "dtype": "float16"}

    def validate_params(self, params: dict[str, Any]) -> dict[str, Any]:
        m = super().validate_params(params)
        check_range(self.name, "p", m["p"], lo=0.0, hi=1.0, hi_open=True)
        check_seed(self.name, m["seed"])
        if m["stream"] is not None:
            check_range(self.name, "stream", m["stream"], lo=0, hi=0xFFFFFFFF, integer=True)
        if m["dtype"] not in VALUE_DTYPES:
            raise InvalidCodecParamsError(f"codec 'dare': dtype={m['dtype']!r} is not one of {', '.join(VALUE_DTYPES)}")
        return m

    def encode(self, inp: EncodeInput, params: dict[str, Any]) -> Encoded:
        delta = inp.delta
        if not torch.isfinite(delta).all():
            raise CodecError(f"tensor {inp.name!r}: the delta has NaN or Inf values; dare cannot code them")
        p = float(params["p"])
        stream = params["stream"] if params["stream"] is not None else name_stream(inp.name)
        mask = keep_mask(params["seed"], stream, (delta.numel(),), p)
        kept = delta.reshape(-1)[mask].to(torch.float32) * (1.0 / (1.0 - p))
        norm = kept.abs().max() if kept.numel() else torch.tensor(0.0)
        norm = torch.where(norm > 0, norm, torch.ones(())).to(torch.float32).reshape(1)
        values = (kept / norm).to(VALUE_DTYPES[params["dtype"]])
        out = {"p": p, "seed": params["seed"], "stream": stream, "dtype": params["dtype"]}
        return Encoded({"values": values, "norm": norm}, out)

    def check_decode(self, params: dict[str, Any], stored: Mapping[str, StoredSpec],
                     shape: tuple[int, ...], dtype: torch.dtype) -> None:
        param_float(self.name, params, "p", 0.0, 1.0, hi_open=True)
        param_int(self.name, params, "seed", 0, 0xFFFFFFFF)
        param_int(self.name, params, "stream", 0, 0xFFFFFFFF)
        vdtype = VALUE_DTYPES[param_choice(self.name, params, "dtype", tuple(VALUE_DTYPES))]
        # The exact count is the seeded mask's popcount (checked when decoding); at most numel.
        expect_stored(self.name, stored, {"values": (vdtype, math.prod(shape)), "norm": (torch.float32, (1,))})

    def decode_delta(self, stored: dict[str, torch.Tensor], params: dict[str, Any], shape: tuple[int, ...]) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= int(s)
        mask = keep_mask(params["seed"], params["stream"], (numel,), params["p"])
        values, norm = stored["values"], stored["norm"]
        n = int(mask.sum())
        if values.dtype != VALUE_DTYPES[params["dtype"]] or tuple(values.shape) != (n,) or tuple(norm.shape) != (1,):
            raise CodecError(
                f"dare: stored values {values.dtype} {list(values.shape)} do not fit the {n} kept elements of {list(shape)}")
        out = torch.zeros(numel, dtype=torch.float32)
        out[mask] = values.to(torch.float32) * norm.to(torch.float32)
        return out.reshape(shape)

    def expected_nbytes(self, shape: tuple[int, ...], params: dict[str, Any]) -> int | None:
        """``2 * N_kept + 4``; ``N_kept`` is the popcount of the seeded mask (known once ``stream`` is)."""
        if params.get("stream") is None:
            return None
        numel = 1
        for s in shape:
            numel *= int(s)
        return 2 * int(keep_mask(params["seed"], params["stream"], (numel,), params["p"]).sum()) + 4
