"""Tensors equal bit for bit to the base: recorded in the manifest, zero stored bytes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from . import register_codec
from .base import Codec, EncodeInput, Encoded, StoredSpec, expect_stored
from ..errors import CodecError, InvalidCodecParamsError
from ..format.io import tensor_bytes


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when two tensors have the same dtype, shape and bytes (NaN payloads included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(torch.equal(tensor_bytes(a), tensor_bytes(b)))


@register_codec
class Unchanged(Codec):
    """The fine-tuned tensor is the base tensor; reconstruct returns the base as-is."""

    name = "unchanged"

    def encode(self, inp: EncodeInput, params: dict[str, Any]) -> Encoded:
        base, ft = inp.base, inp.finetuned
        if base is None or not same_bits(base, ft):
            raise CodecError(f"tensor {inp.name!r} differs from the base; 'unchanged' cannot code it")
        return Encoded({}, {})

    def check_decode(self, params: dict[str, Any], stored: Mapping[str, StoredSpec],
                     shape: tuple[int, ...], dtype: torch.dtype) -> None:
        if params:
            raise InvalidCodecParamsError(f"codec 'unchanged' takes no params, got {sorted(map(str, params))[:5]}")
        expect_stored(self.name, stored, {})

    def decode_delta(self, stored: dict[str, torch.Tensor], params: dict[str, Any], shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.float32)

    def reconstruct(self, stored, params, base, shape, dtype):  # type: ignore[no-untyped-def]
        if base is None:
            raise CodecError("an unchanged tensor needs the base tensor to rebuild")
        return base

    def expected_nbytes(self, shape: tuple[int, ...], params: dict[str, Any]) -> int:
        return 0
