"""The one interface every codec implements (one module per codec, registered by name).

A codec turns one (base, fine-tuned) tensor pair into a few *stored* tensors plus JSON
params, and turns them back. Delta codecs only implement :meth:`Codec.decode_delta`;
the shared :meth:`Codec.reconstruct` adds the delta to the base in float32 and rounds once
to the fine-tune's dtype, which is the reconstruction rule of ``format_spec.md``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ._accel import HALF_KINDS, native
from ..errors import CodecError, InvalidCodecParamsError


def _fused_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the native kernels can read both tensors elementwise as flat buffers (same shape, CPU, contiguous,
    float kinds)."""
    return (a.dtype in HALF_KINDS and b.dtype in HALF_KINDS and a.shape == b.shape and a.is_contiguous()
            and b.is_contiguous() and a.device.type == "cpu" and b.device.type == "cpu")


def _raw(t: torch.Tensor) -> Any:
    """A float32 / 16-bit tensor's elements as a numpy array of its bits (16-bit kinds as int16)."""
    return (t.view(torch.int16) if t.element_size() == 2 else t).reshape(-1).numpy()


def diff_into(ft: torch.Tensor, base: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = float32(ft) - float32(base)`` (torch's bits) for same-shape float32 / 16-bit tensors and a contiguous
    float32 ``out`` of their size: one native pass when built, no widened copies; returns ``out``."""
    nat = native()
    if nat is not None and _fused_ok(ft, base) and out.is_contiguous():
        if out.numel():
            nat.diff(_raw(ft), HALF_KINDS[ft.dtype], _raw(base), HALF_KINDS[base.dtype], out.view(-1).numpy())
        return out
    torch.sub(ft.to(torch.float32), base.to(torch.float32), out=out.view(ft.shape))
    return out


#: Elements squared in float64 at a time by :meth:`EncodeInput.delta_sumsq` without the native kernels.
SUMSQ_BLOCK = 1 << 20
#: Elements of a block of delta rows (:attr:`EncodeInput._delta_rows`) a codec asks for at a time.
ROW_BLOCK = 1 << 20


def row_blocks(rows: int, cols: int) -> Iterator[tuple[int, int]]:
    """``(r0, r1)``: the blocks of whole rows, about :data:`ROW_BLOCK` elements each, that a ``[rows, cols]`` delta
    is handled in when it is not held whole."""
    step = max(1, ROW_BLOCK // max(cols, 1))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


@dataclass
class EncodeInput:
    """What a codec sees of one tensor: the base and fine-tuned tensors in their own dtypes."""

    name: str
    finetuned: torch.Tensor
    base: torch.Tensor | None
    #: Optional calibration inputs of the layer (rows = tokens, cols = in_features), for codecs that use them.
    calibration: torch.Tensor | None = None
    _delta: torch.Tensor | None = field(default=None, repr=False)
    #: Top singular triplets ``(U, S, Vh)`` of the 2-D delta, shared by the low-rank codecs (codecs/_svd.py).
    _svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    #: Per-input results a codec reuses across settings of the same tensor (allocation measures several),
    #: keyed by the codec: e.g. DeltaDQ's group-size sums and ``||D||^2``.
    _memo: dict[str, Any] = field(default_factory=dict, repr=False)
    #: ``nbytes -> uint8 buffer or None``: where :attr:`delta` may be computed (a worker's reused scratch, so no
    #: fresh pages per tensor); the caller keeps codec outputs from aliasing it.
    _delta_buffer: Callable[[int], torch.Tensor | None] | None = field(default=None, repr=False)
    #: ``bits(finetuned) XOR bits(base)`` computed already, as ``(uint8 bytes, byte-plane shuffled?)``: ``raw``'s
    #: ``xor`` payload (compress streams it from the files; ``finetuned`` and ``base`` then carry shapes only).
    _xor: tuple[torch.Tensor, bool] | None = field(default=None, repr=False)
    #: ``(r0, r1) -> float32 delta rows [r0, r1)`` of the ``[rows, cols]`` view (a view that lives until the next
    #: call): the delta a block of rows at a time, for a codec that never needs it whole (compress streams a
    #: large one from the files); :attr:`delta` assembles it from these when a codec asks for it anyway.
    _delta_rows: Callable[[int, int], torch.Tensor] | None = field(default=None, repr=False)

    @property
    def delta(self) -> torch.Tensor:
        """``float32(finetuned) - float32(base)``, computed once and cached."""
        if self.base is None:
            raise CodecError(f"tensor {self.name!r} has no base tensor, so it has no delta")
        if self._delta is None and self._delta_rows is not None:
            rows, cols = matrix_view_shape(self.finetuned.shape)
            out = torch.empty(rows, cols, dtype=torch.float32)
            for r0, r1 in row_blocks(rows, cols):
                out[r0:r1] = self._delta_rows(r0, r1)
            self._delta = out.view(self.finetuned.shape)
        if self._delta is None:
            ft, base = self.finetuned, self.base
            fits = ft.shape == base.shape and ft.dtype in HALF_KINDS and base.dtype in HALF_KINDS
            buf = self._delta_buffer(ft.numel() * 4) if self._delta_buffer is not None and fits else None
            out = buf.view(-1)[:ft.numel() * 4].view(torch.float32).view(ft.shape) if buf is not None else None
            if native() is not None and fits and _fused_ok(ft, base):  # one pass, no widened copies; torch's bits
                out = torch.empty(ft.shape, dtype=torch.float32) if out is None else out
                self._delta = diff_into(ft, base, out)
            elif out is not None:  # the same bits: exact widening, one float32 subtraction
                self._delta = out.copy_(ft).sub_(base)
            else:
                self._delta = ft.to(torch.float32) - base.to(torch.float32)
        return self._delta

    def delta_sumsq(self) -> float:
        """``||delta||^2`` in float64, computed once (NaN or Inf when any element is: a finite float32 squared
        cannot overflow a double)."""
        d2 = self._memo.get("delta_sumsq")
        nat = native()
        if d2 is None and self._delta is None and nat is not None and self.base is not None and _fused_ok(self.finetuned, self.base):
            # Without the delta tensor (compress measures every tensor; most never need theirs whole).
            d2 = nat.diff_sumsq(_raw(self.finetuned), HALF_KINDS[self.finetuned.dtype], _raw(self.base), HALF_KINDS[self.base.dtype])
            self._memo["delta_sumsq"] = d2
        if d2 is None:
            delta = self.delta
            if nat is not None and delta.dtype == torch.float32 and delta.is_contiguous() and delta.device.type == "cpu":
                d2 = nat.sumsq(delta.numpy())
            else:  # squared in float64, a block at a time
                flat = delta.reshape(-1)
                d2 = math.fsum(float(torch.dot(b, b)) for b in (flat[i:i + SUMSQ_BLOCK].to(torch.float64)
                                                                 for i in range(0, flat.numel(), SUMSQ_BLOCK)))
            self._memo["delta_sumsq"] = d2
        return d2


@dataclass
class Encoded:
    """A codec's output: stored tensors keyed by role (``"sign"``, ``"scale"``...) and JSON params."""

    tensors: dict[str, torch.Tensor]
    params: dict[str, Any]
    #: Optional ``{"delta_l2", "error_l2"}`` when the codec knows them cheaply (else compress decodes to measure),
    #: and ``"error_dot"`` (``Σ (Δ̂ - Δ)·Δ``), which lets the allocation score a candidate without decoding it.
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
    #: Base dtypes :meth:`reconstruct_` rebuilds into in place (a codec whose :meth:`add_delta_` fuses the
    #: rounding for bfloat16 adds it: a bf16 model then rebuilds without float32 copies).
    inplace_dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32,)
    #: Named settings selectable with the ``preset`` param (``--preset``); empty when the codec has none.
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    #: True when the codec's error is a property of the whole matrix (low rank), so it cannot be measured
    #: on a sample of rows: the allocation then measures it on the whole tensor.
    whole_matrix: ClassVar[bool] = False
    #: True when :meth:`encode` reads nothing of an input but :attr:`EncodeInput.delta` (and the shapes and dtypes of
    #: its tensors): compress may then hand it only the delta, computed from the files a chunk at a time, so a large
    #: tensor is never in memory three times (fine-tune, base, float32 delta).
    delta_only: ClassVar[bool] = False
    #: Stored roles whose size does not grow with the rows coded (a codebook): compress's allocation, which
    #: measures candidates on a row sample, scales the other roles' bytes to the whole tensor, not these.
    fixed_size_roles: ClassVar[frozenset[str]] = frozenset()

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

    def encode_many(self, inp: EncodeInput, params_list: list[dict[str, Any]]) -> list[Encoded | CodecError]:
        """:meth:`encode` of one tensor with each of several settings (the allocation measures a codec's ladder on
        one row sample): each result, or the :class:`CodecError` its setting raised. A codec may share work between
        the settings (DeltaDQ: one native call for all); the results are those :meth:`encode` gives."""
        out: list[Encoded | CodecError] = []
        for params in params_list:
            try:
                out.append(self.encode(inp, params))
            except CodecError as exc:
                out.append(exc)
        return out

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

    def reconstruct_(
        self,
        stored: dict[str, torch.Tensor],
        params: dict[str, Any],
        base: torch.Tensor | None,
        shape: tuple[int, ...],
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """:meth:`reconstruct`, allowed to overwrite ``base`` (a buffer the caller owns and drops afterwards).

        Codecs using the generic rule add their delta into a float32 base in place (or a base of another of
        :attr:`inplace_dtypes` when the output has its dtype: one rounding either way)
        (:meth:`add_delta_`), so rebuilding allocates no second tensor; same bits as :meth:`reconstruct`
        (float32 addition is commutative)."""
        if (type(self).reconstruct is not Codec.reconstruct or base is None or base.dtype not in self.inplace_dtypes
                or (base.dtype != torch.float32 and base.dtype != dtype)
                or not base.is_contiguous() or base.numel() != math.prod(shape)):
            return self.reconstruct(stored, params, base, shape, dtype)
        out = base.reshape(shape)
        self.add_delta_(out, stored, params, tuple(shape))
        return out.to(dtype)

    def add_delta_(self, target: torch.Tensor, stored: dict[str, torch.Tensor], params: dict[str, Any],
                   shape: tuple[int, ...]) -> None:
        """``target = dtype(float32(target) + decode_delta(...))`` in place for a contiguous ``target`` of ``shape``
        (float32, or another of :attr:`inplace_dtypes`, rounded once as :meth:`reconstruct` rounds); codecs may fuse it."""
        if target.dtype == torch.float32:
            target.add_(self.decode_delta(stored, params, shape))
        else:
            target.copy_((target.to(torch.float32) + self.decode_delta(stored, params, shape)).to(target.dtype))

    def measured_params(self, params: dict[str, Any], sample: Encoded) -> dict[str, Any]:
        """The params to encode a whole tensor with once ``params`` were measured on a row sample of it, giving
        ``sample``: choices the codec made from the data (DeltaDQ's ``group_size="auto"``) are kept, so the tensor
        is coded as it was measured and the choice is not made again on all of it. The default: ``params``."""
        return params

    def svd_rank(self, params: Mapping[str, Any]) -> int:
        """Singular triplets :meth:`encode` takes from the delta's SVD (validated params; 0: no SVD), so a
        caller measuring several low-rank settings of one tensor can factorise it once, at the largest."""
        return 0

    def base_shape(self, params: Mapping[str, Any], shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the base tensor an entry of ``shape`` decodes against (params already checked by
        :meth:`check_decode`): the entry's own, except for codecs that rebuild resized tensors."""
        return tuple(shape)

    def expected_nbytes(self, shape: tuple[int, ...], params: dict[str, Any]) -> int | None:
        """Stored bytes predicted from shape and params alone (None when data-dependent, e.g. zstd)."""
        return None

    def check_decode(self, params: dict[str, Any], stored: Mapping[str, StoredSpec],
                     shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """Validate an *untrusted* entry before anything is read or allocated.

        ``params`` come from the manifest, ``stored`` maps each role to the ``(dtype, shape)`` its
        stored tensor has in the safetensors header, ``shape``/``dtype`` are the entry's (already
        checked: non-negative ints, numel <= 2^40, a known dtype). Implementations check every
        param (type, range, membership) and the exact role set, dtype and shape of every stored
        tensor, so that decoding allocates O(numel) and raises nothing but typed errors:
        :class:`InvalidCodecParamsError` for params, :class:`CodecError` for stored tensors.
        The default (third-party codecs) checks nothing.
        """


#: What the safetensors header says of one stored tensor: ``(dtype, shape)``.
StoredSpec = tuple[torch.dtype, tuple[int, ...]]
#: Bound on every dimension and element count of a tensor read from a delta (1 Ti elements).
MAX_NUMEL = 1 << 40


def param_int(codec: str, params: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    """``params[key]`` as an integer in ``[lo, hi]`` (bools, floats, strings refused)."""
    value = params.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidCodecParamsError(f"codec {codec!r}: {key}={_short(value)} must be an integer in [{lo}, {hi}]")
    return value


def param_float(codec: str, params: Mapping[str, Any], key: str, lo: float, hi: float, *,
                lo_open: bool = False, hi_open: bool = False) -> float:
    """``params[key]`` as a finite number in the interval (bools, NaN, inf, strings refused)."""
    value = params.get(key)
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok:
        v = float(value) if not isinstance(value, int) or abs(value) < 1 << 53 else float("inf")
        ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise InvalidCodecParamsError(f"codec {codec!r}: {key}={_short(value)} must be a number in {left}{lo}, {hi}{right}")
    return float(value)


def param_choice(codec: str, params: Mapping[str, Any], key: str, choices: tuple[Any, ...]) -> Any:
    """``params[key]``, which must be one of ``choices`` (compared by type too: ``1`` is not ``True``)."""
    value = params.get(key)
    if not any(type(value) is type(c) and value == c for c in choices):
        raise InvalidCodecParamsError(f"codec {codec!r}: {key}={_short(value)} is not one of {', '.join(map(repr, choices))}")
    return value


def expect_stored(codec: str, stored: Mapping[str, StoredSpec],
                  expected: Mapping[str, tuple[torch.dtype, tuple[int, ...] | int]]) -> None:
    """The stored roles are exactly ``expected``'s, each with its dtype and shape; a shape given as an
    int ``L`` means "1-D, at most ``L`` elements" (a code stream or zstd frame that may be shorter)."""
    if set(stored) != set(expected):
        missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
        raise CodecError(f"codec {codec!r}: stored roles {sorted(stored)} are not the expected {sorted(expected)}"
                         + (f" (missing {missing})" if missing else "") + (f" (unexpected {extra})" if extra else ""))
    for role, (dtype, shape) in expected.items():
        got_dtype, got_shape = stored[role][0], tuple(stored[role][1])
        if isinstance(shape, int):
            ok_shape = len(got_shape) == 1 and got_shape[0] <= shape
            want = f"1-D of at most {shape} elements"
        else:
            ok_shape = got_shape == tuple(shape)
            want = str(list(shape))
        if got_dtype != dtype or not ok_shape:
            raise CodecError(f"codec {codec!r}: stored {role!r} is {_dt(got_dtype)} {list(got_shape)}, "
                             f"expected {_dt(dtype)} {want}")


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
