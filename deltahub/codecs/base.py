"""The one interface every codec implements (one module per codec, registered by name).

A codec turns one (base, fine-tuned) tensor pair into a few *stored* tensors plus JSON
params, and turns them back. Delta codecs only implement :meth:`Codec.decode_delta`;
the shared :meth:`Codec.reconstruct` adds the delta to the base in float32 and rounds once
to the fine-tune's dtype, which is the reconstruction rule of ``format_spec.md``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..errors import CodecError, InvalidCodecParamsError


@dataclass
class EncodeInput:
    """What a codec sees of one tensor: the base and fine-tuned tensors in their own dtypes."""

    name: str
    finetuned: torch.Tensor
    base: torch.Tensor | None
    #: Optional calibration inputs of the layer (rows = tokens, cols = in_features), for codecs that use them.
    calibration: torch.Tensor | None = None
    _delta: torch.Tensor | None = field(default=None, repr=False)

    @property
    def delta(self) -> torch.Tensor:
        """``float32(finetuned) - float32(base)``, computed once and cached."""
        if self.base is None:
            raise CodecError(f"tensor {self.name!r} has no base tensor, so it has no delta")
        if self._delta is None:
            self._delta = self.finetuned.to(torch.float32) - self.base.to(torch.float32)
        return self._delta


@dataclass
class Encoded:
    """A codec's output: stored tensors keyed by role (``"sign"``, ``"scale"``...) and JSON params."""

    tensors: dict[str, torch.Tensor]
    params: dict[str, Any]
    #: Optional ``{"delta_l2", "error_l2"}`` when the codec knows them cheaply (else compress decodes to measure).
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes the stored tensors take in the safetensors payload."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def matrix_view_shape(shape: tuple[int, ...] | list[int]) -> tuple[int, int]:
    """The 2-D ``(rows, cols)`` view codecs work on: the last axis is ``cols``, all others fold into ``rows``.

    For a Linear weight ``[out, in]`` a row is one output unit; a 1-D tensor is one row.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        return 1, 1
    cols = shape[-1]
    rows = 1
    for s in shape[:-1]:
        rows *= s
    return rows, cols


class Codec(ABC):
    """Base class of codecs. Subclasses set ``name`` and implement encode + one of the decoders."""

    #: Registry name, written into the manifest's per-tensor ``codec`` field.
    name: ClassVar[str]
    #: True when the codec stores a delta (needs the base to rebuild); False for full-tensor codecs.
    needs_base: ClassVar[bool] = True
    #: Default params, merged under the user's params before validation.
    default_params: ClassVar[dict[str, Any]] = {}
    #: Named settings selectable with the ``preset`` param (``--preset``); empty when the codec has none.
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    def validate_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """Merge defaults and check ranges; raise :class:`InvalidCodecParamsError` on bad input."""
        merged = {**self.default_params, **params}
        unknown = set(merged) - set(self.default_params)
        if unknown:
            raise InvalidCodecParamsError(
                f"codec {self.name!r} does not take parameter(s) {sorted(unknown)}; it takes {sorted(self.default_params)}"
            )
        return merged

    @abstractmethod
    def encode(self, inp: EncodeInput, params: dict[str, Any]) -> Encoded:
        """Compress one tensor. ``params`` were validated by :meth:`validate_params`."""

    def decode_delta(
        self, stored: dict[str, torch.Tensor], params: dict[str, Any], shape: tuple[int, ...]
    ) -> torch.Tensor:
        """The float32 delta, shaped like the tensor. Delta codecs must implement this."""
        raise CodecError(f"codec {self.name!r} stores full tensors, not deltas")

    def reconstruct(
        self,
        stored: dict[str, torch.Tensor],
        params: dict[str, Any],
        base: torch.Tensor | None,
        shape: tuple[int, ...],
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """The fine-tuned tensor: ``dtype(float32(base) + decode_delta(...))`` (format_spec.md, Reconstruction)."""
        if base is None:
            raise CodecError(f"codec {self.name!r} needs the base tensor to rebuild")
        delta = self.decode_delta(stored, params, tuple(shape))
        return (base.to(torch.float32) + delta).to(dtype)

    def expected_nbytes(self, shape: tuple[int, ...], params: dict[str, Any]) -> int | None:
        """Stored bytes predicted from shape and params alone (None when data-dependent, e.g. zstd)."""
        return None


def check_range(codec: str, key: str, value: Any, *, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False, integer: bool = False) -> None:
    """Raise :class:`InvalidCodecParamsError` unless ``value`` lies in the given interval."""
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        raise InvalidCodecParamsError(f"codec {codec!r}: {key} must be an integer, got {value!r}")
    if not integer and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise InvalidCodecParamsError(f"codec {codec!r}: {key} must be a number, got {value!r}")
    bad = (
        value != value  # NaN lies in no interval (and would pass every comparison below)
        or (lo is not None and (value <= lo if lo_open else value < lo))
        or (hi is not None and (value >= hi if hi_open else value > hi))
    )
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        raise InvalidCodecParamsError(
            f"codec {codec!r}: {key}={value!r} is outside {left}{lo if lo is not None else '-inf'}, "
            f"{hi if hi is not None else 'inf'}{right}"
        )
