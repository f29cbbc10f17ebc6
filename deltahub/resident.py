"""Resident deltas: keep one base model in memory and serve several fine-tunes from it (PEFT-style).

:func:`Delta.to_model <deltahub.delta.Delta.to_model>` rebuilds a full fine-tune, which costs a
whole model per fine-tune. Here the base is loaded once and each delta is *attached* under an
adapter name instead:

* every ``nn.Linear`` whose weight is coded with a delta codec (``bitdelta``, ``dare``,
  ``topk-ternary``, …) is wrapped in a :class:`DeltaLinear` that shares the base layer (its
  weight is never copied) and holds, per adapter, the delta **in its stored, compressed form**.
  For BitDelta that is the packed sign bits (uint8) plus float32 scales, about 1/16 of the fp16
  weight (1/32 of fp32). The forward pass is ``base(x) + x @ Δ̂ᵀ`` where ``Δ̂`` is exactly the
  decoded delta of ``format_spec.md``; for BitDelta the ±1 sign matrix is unpacked in ``x``'s
  dtype a chunk of output rows at a time (bounded temporary memory, never a permanent dense
  weight) and the scales are applied per row / tensor after the matmul or per group before it.
  Other delta codecs keep their stored tensors and decode with their codec on the fly (or once,
  cached, with ``cache_decoded=True``).
* tensors coded ``raw`` (embeddings, LM head, norms, biases…) or coded with a delta codec but not
  the weight of an ``nn.Linear`` cannot be shared: their exact rebuilt tensor is kept per
  adapter (**full memory cost of those tensors per adapter**, e.g. the embedding matrix) and
  swapped into the model's parameter when that adapter is active. Tensors coded ``unchanged``
  cost nothing. Tied parameters (``lm_head`` tied to the embedding) are one ``Parameter``, so a
  swap changes both, as in the rebuilt model.

Selecting adapters: :func:`set_adapter` (one adapter for every row; ``None`` = base),
:func:`disable_adapters` (context: base only) and :func:`use_adapters` (context: one adapter per
batch row, like PEFT's ``adapter_names=[...]`` mixed-batch inference; each :class:`DeltaLinear`
groups the rows by adapter). A mixed batch needs the same non-shareable (raw) tensors for every
row; otherwise :class:`MixedAdapterError` is raised.

Exactness: with adapter ``A`` active each wrapped layer computes ``x Wᵀ + b + x Δ̂ᵀ``, which equals
``x (W + Δ̂)ᵀ + b`` up to float rounding of a different summation order (tested in float64). The
full rebuild rounds ``W + Δ̂`` to the checkpoint dtype once, so float32 results agree to ~1e-6
relative. :func:`merge_and_unload` produces the rebuilt weights bit-for-bit.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .codecs import get_codec, matrix_view_shape
from .codecs._bits import packed_cols
from .codecs.base import Codec
from .codecs._bits import _PM1_TABLE
from .codecs.bitdelta import expand_scales, scale_shape
from .codecs.unchanged import same_bits
from .delta import Delta
from .errors import BaseMismatchError, CodecError, DeltaHubError, ShapeMismatchError
from .format.manifest import TensorEntry
from .format.spec import dtype_from_name, dtype_name

#: Output rows of a BitDelta sign matrix unpacked at once in the forward pass. The temporary
#: ±1 matrix holds ``CHUNK_ROWS * in_features`` elements of ``x``'s dtype.
CHUNK_ROWS = 1024

#: Codecs that never become resident delta modules.
_NOT_DELTA_CODECS = frozenset({"raw", "unchanged"})

_STATE_ATTR = "_deltahub_resident"


class MixedAdapterError(DeltaHubError, ValueError):
    """A mixed batch selects adapters whose non-shareable (raw) tensors differ, or names an unknown adapter."""


# ---------------------------------------------------------------------------------------- helpers


_PM1_CACHE: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _pm1_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The byte -> 8 signs (±1, LSB first) table in ``dtype`` on ``device`` (cached: 256×8 elements)."""
    key = (dtype, device)
    t = _PM1_CACHE.get(key)
    if t is None:
        t = _PM1_TABLE.to(device=device, dtype=dtype)
        _PM1_CACHE[key] = t
    return t


def unpack_pm1(sign: torch.Tensor, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """Packed sign bits uint8 ``[rows, ceil(cols/8)]`` -> ``[rows, cols]`` of ±1 in ``dtype`` (bit 1 = +1)."""
    rows = sign.shape[0]
    table = _pm1_table(dtype, sign.device)
    return table.index_select(0, sign.reshape(-1).to(torch.int64)).reshape(rows, -1)[:, :cols]


def is_delta_codec(codec_name: str) -> bool:
    """True for codecs that store a decodable delta (``decode_delta``), i.e. can be resident modules."""
    if codec_name in _NOT_DELTA_CODECS:
        return False
    codec = get_codec(codec_name)
    return codec.needs_base and type(codec).decode_delta is not Codec.decode_delta


def _check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter names must be non-empty strings without '.', got {name!r}")


def tensor_sha256(t: torch.Tensor) -> str:
    """Hex sha256 of a tensor's raw bytes (row-major, native little-endian), as in the manifest's ``base_sha256``."""
    flat = t.detach().reshape(-1).contiguous().cpu()
    return hashlib.sha256(flat.view(torch.uint8).numpy()).hexdigest()


class _DeviceOnly(nn.Module):
    """A module whose buffers follow ``.to(device)`` but keep their dtype.

    The buffers are a storage format (packed bits, float32 scales, codec payloads), not compute
    weights: ``model.half()`` / ``model.to(torch.float64)`` must not round or reinterpret them.
    """

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> _DeviceOnly:  # type: ignore[override]
        for key, buf in self._buffers.items():
            if buf is not None:
                device = fn(torch.empty(0, dtype=buf.dtype, device=buf.device)).device
                self._buffers[key] = buf.to(device)
        return self


class _BitDeltaAdapter(_DeviceOnly):
    """One BitDelta delta in stored form: packed signs ``[out, ceil(in/8)]`` uint8 + float32 scales."""

    sign: torch.Tensor
    scale: torch.Tensor

    def __init__(self, sign: torch.Tensor, scale: torch.Tensor, params: dict[str, Any], shape: tuple[int, int], dtype: str) -> None:
        super().__init__()
        rows, cols = shape
        self.granularity: str = params["granularity"]
        self.group_size: int = int(params.get("group_size", 0))
        self.params = dict(params)
        self.shape = (rows, cols)
        self.dtype_name = dtype
        if tuple(sign.shape) != (rows, packed_cols(cols)) or sign.dtype != torch.uint8:
            raise CodecError(f"bitdelta: stored sign {sign.dtype} {list(sign.shape)} does not fit weight {list(shape)}")
        if tuple(scale.shape) != scale_shape(rows, cols, self.granularity, self.group_size):
            raise CodecError(f"bitdelta: stored scale {list(scale.shape)} does not fit weight {list(shape)} ({self.granularity})")
        self.register_buffer("sign", sign.contiguous(), persistent=False)
        self.register_buffer("scale", scale.to(torch.float32).contiguous(), persistent=False)

    codec_name = "bitdelta"

    def stored(self) -> dict[str, torch.Tensor]:
        """The stored tensors by role, as in the delta file."""
        return {"sign": self.sign, "scale": self.scale}

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole decoded delta ``where(bit, s, -s)`` as ``[out, in]`` (for merging / tests)."""
        rows, cols = self.shape
        s = expand_scales(self.scale, rows, cols, self.granularity, self.group_size)
        return (unpack_pm1(self.sign, cols, torch.float32) * s).to(dtype)

    def delta_matmul(self, x: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
        """``x @ Δ̂ᵀ`` for ``x`` ``[n, in]``, unpacking ``chunk_rows`` output rows of signs at a time."""
        rows, cols = self.shape
        dtype = x.dtype
        out = x.new_empty((x.shape[0], rows))
        for r0 in range(0, rows, chunk_rows):
            r1 = min(r0 + chunk_rows, rows)
            pm1 = unpack_pm1(self.sign[r0:r1], cols, dtype)
            if self.granularity == "group":
                s = expand_scales(self.scale[r0:r1].to(dtype), r1 - r0, cols, "group", self.group_size)
                out[:, r0:r1] = x @ (pm1 * s).T
            elif self.granularity == "row":
                out[:, r0:r1] = (x @ pm1.T) * self.scale[r0:r1].to(dtype)
            else:
                out[:, r0:r1] = x @ pm1.T
        if self.granularity == "tensor":
            out.mul_(self.scale[0].to(dtype))
        return out


class _GenericAdapter(_DeviceOnly):
    """Any other delta codec: its stored tensors as buffers, decoded with the codec when needed."""

    def __init__(self, codec: str, stored: dict[str, torch.Tensor], params: dict[str, Any], shape: tuple[int, int], dtype: str,
                 *, cache_decoded: bool = False) -> None:
        super().__init__()
        self.codec_name = codec
        self.params = dict(params)
        self.shape = shape
        self.dtype_name = dtype
        self.roles = list(stored)
        self.cache_decoded = cache_decoded
        for role, t in stored.items():
            self.register_buffer(f"stored_{role}", t.contiguous(), persistent=False)
        self._cache: torch.Tensor | None = None
        if cache_decoded:
            self._cache = self._decode()  # fail early on corrupt payloads

    def stored(self) -> dict[str, torch.Tensor]:
        """The stored tensors by role, as in the delta file."""
        return {role: getattr(self, f"stored_{role}") for role in self.roles}

    def _decode(self) -> torch.Tensor:
        d = get_codec(self.codec_name).decode_delta({k: v.cpu() for k, v in self.stored().items()}, self.params, self.shape)
        return d.reshape(self.shape)

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float32 decoded delta ``[out, in]`` (cached when ``cache_decoded``), cast to ``dtype``."""
        d = self._cache if self._cache is not None else self._decode()
        return d.to(dtype)

    def delta_matmul(self, x: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
        """``x @ Δ̂ᵀ`` for ``x`` ``[n, in]`` (the codec decodes the whole delta; codecs have no row-chunked decoder)."""
        d = self.dense(x.dtype).to(x.device)
        if self._cache is not None and self._cache.device != x.device:
            self._cache = self._cache.to(x.device)
        return x @ d.T


_Adapter = _BitDeltaAdapter | _GenericAdapter


# ---------------------------------------------------------------------------------------- DeltaLinear


class DeltaLinear(nn.Module):
    """An ``nn.Linear`` plus resident compressed deltas: ``y = base(x) + x @ Δ̂_activeᵀ``.

    The base layer is shared, never copied (its weight keeps its ``data_ptr``). Each adapter's
    delta lives in ``self.adapters[name]`` in stored form. Which delta applies is decided by
    ``disabled`` (base only), ``batch_adapters`` (one adapter name or ``None`` per batch row) and
    ``active_adapter``, in that order; the model-level functions of this module set them.
    """

    def __init__(self, base_layer: nn.Linear, *, chunk_rows: int = CHUNK_ROWS) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"DeltaLinear wraps an nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self._batch: list[str | None] | None = None
        self._groups: list[tuple[str | None, torch.Tensor]] = []
        self.disabled = False
        self.chunk_rows = chunk_rows

    @property
    def batch_adapters(self) -> list[str | None] | None:
        """One adapter name (or ``None``) per batch row, or ``None`` when every row uses ``active_adapter``."""
        return self._batch

    @batch_adapters.setter
    def batch_adapters(self, names: list[str | None] | None) -> None:
        self._batch = None if names is None else list(names)
        self._groups = []
        if names is not None:
            rows: dict[str | None, list[int]] = {}
            for i, n in enumerate(names):
                rows.setdefault(n, []).append(i)
            self._groups = [(n, torch.tensor(idx, dtype=torch.int64)) for n, idx in rows.items()]

    # Read-through attributes so code that inspects a Linear keeps working.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def add_adapter(self, name: str, codec: str, stored: dict[str, torch.Tensor], params: dict[str, Any], dtype: str = "float32",
                    *, cache_decoded: bool = False) -> None:
        """Store one adapter's delta for this layer (stored tensors as read from the delta file)."""
        _check_adapter_name(name)
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} is already attached to this layer")
        shape = (self.out_features, self.in_features)
        device = self.base_layer.weight.device
        stored = {k: v.to(device) for k, v in stored.items()}
        adapter: _Adapter
        if codec == "bitdelta":
            adapter = _BitDeltaAdapter(stored["sign"], stored["scale"], params, shape, dtype)
        elif is_delta_codec(codec):
            adapter = _GenericAdapter(codec, stored, params, shape, dtype, cache_decoded=cache_decoded)
        else:
            raise CodecError(f"codec {codec!r} does not store a delta; it cannot be a resident delta module")
        self.adapters[name] = adapter

    def delete_adapter(self, name: str) -> None:
        """Drop one adapter's delta from this layer."""
        del self.adapters[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def set_adapter(self, name: str | None) -> None:
        """Make ``name`` the delta applied to every row (``None``: base only)."""
        self.active_adapter = name

    @contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Context: this layer computes the base output only."""
        old, self.disabled = self.disabled, True
        try:
            yield
        finally:
            self.disabled = old

    def delta_weight(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The decoded delta ``Δ̂`` of adapter ``name`` as a dense ``[out, in]`` tensor."""
        return self.adapters[name].dense(dtype)

    def _delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        adapter = self.adapters[name]
        x2 = x.reshape(-1, self.in_features)
        return adapter.delta_matmul(x2, self.chunk_rows).reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x)`` plus the selected delta(s): all rows, or grouped by row adapter in a mixed batch."""
        y = self.base_layer(x)
        if self.disabled or not len(self.adapters):
            return y
        names = self.batch_adapters
        if names is not None:
            if x.dim() < 2 or x.shape[0] != len(names):
                raise MixedAdapterError(
                    f"use_adapters() was given {len(names)} adapter names but the batch has {x.shape[0] if x.dim() else 0} rows"
                )
            for name, idx in self._groups:
                if name is None or name not in self.adapters:
                    continue
                idx = idx.to(x.device)
                d = self._delta(name, x.index_select(0, idx))
                y = y.index_add(0, idx, d.to(y.dtype))
            return y
        name = self.active_adapter
        if name is None or name not in self.adapters:
            return y
        return y + self._delta(name, x).to(y.dtype)

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, active={self.active_adapter!r}, chunk_rows={self.chunk_rows}"


# ---------------------------------------------------------------------------------------- model state


@dataclass
class _AdapterInfo:
    """What one attached delta added to the model."""

    name: str
    source: str
    linear_modules: list[str] = field(default_factory=list)
    #: Non-shareable tensors: parameter/buffer name -> exact rebuilt tensor (in the model's dtype).
    raw: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class ResidentState:
    """Per-model bookkeeping of attached deltas (stored on the model as ``_deltahub_resident``)."""

    adapters: dict[str, _AdapterInfo] = field(default_factory=dict)
    #: Base tensors of every name some adapter swaps (the model's own tensor objects).
    base_raw: dict[str, torch.Tensor] = field(default_factory=dict)
    active: str | None = None
    disabled: bool = False
    batch: list[str | None] | None = None
    _mixed_ok: dict[frozenset[str | None], str | None] = field(default_factory=dict)


def resident_state(model: nn.Module) -> ResidentState:
    """The model's :class:`ResidentState` (created empty on first use)."""
    state = model.__dict__.get(_STATE_ATTR)
    if state is None:
        state = ResidentState()
        object.__setattr__(model, _STATE_ATTR, state)
    return state


def _walk_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by its *base* name (DeltaLinear's ``base_layer`` level removed, deltas skipped).

    Tied parameters appear under each of their names (``lm_head.weight`` and ``model.embed_tokens.weight``).
    """
    out: dict[str, torch.Tensor] = {}

    def walk(mod: nn.Module, prefix: str) -> None:
        if isinstance(mod, DeltaLinear):
            walk(mod.base_layer, prefix)
            return
        for n, p in mod._parameters.items():
            if p is not None:
                out[prefix + n] = p
        for n, b in mod._buffers.items():
            if b is not None:
                out[prefix + n] = b
        for n, child in mod._modules.items():
            if child is not None:
                walk(child, f"{prefix}{n}.")

    walk(model, "")
    return out


def _delta_linears(model: nn.Module) -> Iterator[tuple[str, DeltaLinear]]:
    for name, mod in model.named_modules():
        if isinstance(mod, DeltaLinear):
            yield name, mod


def _set_tensor_data(t: torch.Tensor, value: torch.Tensor) -> None:
    """Point a parameter/buffer at ``value`` (cast to its current dtype/device; no copy when they match)."""
    v = value.to(device=t.device, dtype=t.dtype)
    if t.data_ptr() != v.data_ptr() or t.shape != v.shape:
        t.data = v


def _raw_for(state: ResidentState, adapter: str | None, name: str) -> torch.Tensor:
    if adapter is not None and name in state.adapters[adapter].raw:
        return state.adapters[adapter].raw[name]
    return state.base_raw[name]


def _mixed_raw_source(state: ResidentState, names: list[str | None]) -> str | None:
    """The adapter whose raw tensors serve the whole mixed batch; raise when the selected adapters' raw tensors differ."""
    selected = frozenset(names)
    if selected in state._mixed_ok:
        return state._mixed_ok[selected]
    ordered = list(dict.fromkeys(names))
    for tname in state.base_raw:
        first = _raw_for(state, ordered[0], tname)
        for other in ordered[1:]:
            t = _raw_for(state, other, tname)
            if t is not first and not (t.shape == first.shape and torch.equal(t, first)):
                raise MixedAdapterError(
                    f"adapters {ordered[0]!r} and {other!r} have different {tname!r} (an exact, non-shareable tensor "
                    "such as an embedding or norm); they cannot share one mixed batch — run them in separate batches"
                )
    state._mixed_ok[selected] = ordered[0]
    return ordered[0]


def _sync(model: nn.Module) -> None:
    """Push the model's selection to every DeltaLinear and swap in the matching raw tensors."""
    state = resident_state(model)
    if state.disabled:
        raw_source: str | None = None
    elif state.batch is not None:
        raw_source = _mixed_raw_source(state, state.batch)
    else:
        raw_source = state.active
    for _, mod in _delta_linears(model):
        mod.disabled = state.disabled
        mod.active_adapter = state.active
        mod.batch_adapters = None if state.batch is None else list(state.batch)
    tensors = _walk_tensors(model)
    for tname in state.base_raw:
        _set_tensor_data(tensors[tname], _raw_for(state, raw_source, tname))


# ---------------------------------------------------------------------------------------- public API


def _check_base(model: nn.Module, delta: Delta, tensors: dict[str, torch.Tensor], state: ResidentState, check_base: bool) -> None:
    """Shapes of every manifest tensor against the model; with ``check_base`` also the base sha256 per tensor."""
    m = delta.manifest
    skipped: list[str] = []
    for name, entry in m.tensors.items():
        t = tensors.get(name)
        if t is None:
            raise BaseMismatchError(
                f"the model has no tensor {name!r}, which the delta (base {m.base.name_or_path}) has; "
                "resident adapters can only change existing tensors (use Delta.to_model)",
                path=delta.directory,
            )
        if list(t.shape) != list(entry.shape):
            raise ShapeMismatchError(
                f"model tensor {name!r} has shape {list(t.shape)}, the delta's is {entry.shape} "
                f"(made against {m.base.name_or_path}); resident adapters cannot change shapes",
                path=delta.directory,
            )
        if not check_base or entry.base_sha256 is None:
            continue
        if dtype_name(t.dtype) != entry.dtype:
            skipped.append(name)
            continue
        base_t = state.base_raw.get(name, t)
        digest = tensor_sha256(base_t)
        if digest != entry.base_sha256:
            raise BaseMismatchError(
                f"model tensor {name!r} has sha256 {digest[:16]}…, the delta was made against {entry.base_sha256[:16]}… "
                f"(base {m.base.name_or_path}, fingerprint {m.base.fingerprint}); pass check_base=False to attach anyway",
                path=delta.directory,
            )
    if skipped:
        warnings.warn(
            f"{len(skipped)} model tensor(s) (e.g. {skipped[0]!r}) are not in the delta's dtype, so their base sha256 "
            "cannot be checked; only shapes were checked (load the base in the delta's dtype for the full check)",
            stacklevel=3,
        )


def attach_delta(model: nn.Module, delta: Delta | str | Path, adapter_name: str, check_base: bool = True, *,
                 cache_decoded: bool = False, chunk_rows: int = CHUNK_ROWS) -> nn.Module:
    """Attach ``delta`` to ``model`` (its base) as adapter ``adapter_name``; returns ``model``, modified in place.

    Each ``nn.Linear`` whose weight is delta-coded becomes (or gains an adapter in) a
    :class:`DeltaLinear`; other changed tensors (``raw``, or delta-coded non-Linear tensors) are
    rebuilt exactly and kept per adapter (their full size in memory). Everything is read and
    checked before the model is modified, so a failure leaves the model as it was. The first
    adapter attached becomes the active one (like PEFT); later ones do not change the selection.

    ``check_base`` verifies each base tensor's sha256 against the manifest (only for tensors whose
    dtype is the delta's; others are skipped with a warning). Shapes are always checked.
    ``cache_decoded`` keeps the decoded float32 delta of non-BitDelta codecs (faster, much larger).
    """
    _check_adapter_name(adapter_name)
    state = resident_state(model)
    if adapter_name in state.adapters:
        raise ValueError(f"an adapter named {adapter_name!r} is already attached")
    own = not isinstance(delta, Delta)
    d = Delta(delta) if own else delta
    try:
        tensors = _walk_tensors(model)
        _check_base(model, d, tensors, state, check_base)
        linears: list[tuple[str, TensorEntry, dict[str, torch.Tensor]]] = []
        raw: dict[str, torch.Tensor] = {}
        fallback: list[str] = []
        for name, entry in d.manifest.tensors.items():
            if entry.codec == "unchanged":
                continue
            mod_path, _, attr = name.rpartition(".")
            try:
                mod = model.get_submodule(mod_path) if mod_path else model
            except AttributeError:
                mod = None
            if attr == "weight" and isinstance(mod, nn.Linear | DeltaLinear) and is_delta_codec(entry.codec) and len(entry.shape) == 2:
                stored = d.files.stored(entry.stored)
                linears.append((mod_path, entry, stored))
                continue
            base_t = state.base_raw.get(name, tensors[name])
            if entry.codec == "raw" and entry.params.get("mode") == "xor" and dtype_name(base_t.dtype) != entry.dtype:
                raise ShapeMismatchError(
                    f"tensor {name!r} is stored as an exact XOR against a {entry.dtype} base, but the model holds it as "
                    f"{dtype_name(base_t.dtype)}; load the base with torch_dtype={entry.dtype} to attach this delta",
                    path=d.directory,
                )
            rebuilt = d.reconstruct(name, base_t.detach().cpu()).to(dtype=base_t.dtype, device=base_t.device)
            if not same_bits(rebuilt, base_t.detach()):
                raw[name] = rebuilt
                if is_delta_codec(entry.codec):
                    fallback.append(name)
        if fallback:
            nbytes = sum(raw[n].numel() * raw[n].element_size() for n in fallback)
            warnings.warn(
                f"{len(fallback)} delta-coded tensor(s) of {adapter_name!r} (e.g. {fallback[0]!r}) are not nn.Linear weights, "
                f"so they are kept as full exact tensors per adapter ({nbytes / 2**20:.1f} MiB), not as compressed deltas",
                stacklevel=2,
            )
        # Validate the stored payloads before touching the model.
        for mod_path, entry, stored in linears:
            rows, cols = matrix_view_shape(entry.shape)
            if entry.codec == "bitdelta":
                _BitDeltaAdapter(stored["sign"], stored["scale"], entry.params, (rows, cols), entry.dtype)
    finally:
        if own:
            d.close()

    info = _AdapterInfo(adapter_name, str(d.directory))
    for mod_path, entry, stored in linears:
        mod = model.get_submodule(mod_path)
        if not isinstance(mod, DeltaLinear):
            mod = DeltaLinear(mod, chunk_rows=chunk_rows)
            parent_path, _, child = mod_path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, child, mod)
        mod.add_adapter(adapter_name, entry.codec, stored, entry.params, entry.dtype, cache_decoded=cache_decoded)
        info.linear_modules.append(mod_path)
    for name in raw:
        if name not in state.base_raw:
            state.base_raw[name] = tensors[name].data
    info.raw = raw
    state.adapters[adapter_name] = info
    state._mixed_ok.clear()
    if state.active is None and len(state.adapters) == 1:
        state.active = adapter_name
    _sync(model)
    return model


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the attached adapters, in attach order."""
    return list(resident_state(model).adapters)


def active_adapter(model: nn.Module) -> str | None:
    """The adapter applied to every row (``None``: base)."""
    return resident_state(model).active


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Apply adapter ``name`` to every row from now on (``None``: the base model)."""
    state = resident_state(model)
    if name is not None and name not in state.adapters:
        raise KeyError(f"no adapter named {name!r}; attached: {list(state.adapters)}")
    state.active = name
    _sync(model)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Context: the model computes the plain base (deltas and swapped tensors off), restored on exit."""
    state = resident_state(model)
    old = state.disabled
    state.disabled = True
    _sync(model)
    try:
        yield model
    finally:
        state.disabled = old
        _sync(model)


@contextmanager
def use_adapters(model: nn.Module, adapter_names: list[str | None]) -> Iterator[nn.Module]:
    """Context: batch row ``i`` uses adapter ``adapter_names[i]`` (``None``: base) — mixed-batch inference.

    Every :class:`DeltaLinear` groups the rows by adapter and adds each group's delta. Tensors that
    are not shareable (raw embeddings, norms…) are one per model, so all selected adapters must have
    identical ones, else :class:`MixedAdapterError`. Inputs inside the context must have
    ``len(adapter_names)`` rows (dim 0).
    """
    state = resident_state(model)
    names = list(adapter_names)
    unknown = [n for n in names if n is not None and n not in state.adapters]
    if unknown:
        raise MixedAdapterError(f"unknown adapter(s) {sorted(set(unknown))}; attached: {list(state.adapters)}")
    if not names:
        raise MixedAdapterError("use_adapters() needs one adapter name (or None) per batch row, got an empty list")
    old = state.batch
    state.batch = names
    try:
        _sync(model)
    except Exception:
        state.batch = old
        raise
    try:
        yield model
    finally:
        state.batch = old
        _sync(model)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove one adapter; layers left without adapters go back to their plain ``nn.Linear``."""
    state = resident_state(model)
    if name not in state.adapters:
        raise KeyError(f"no adapter named {name!r}; attached: {list(state.adapters)}")
    info = state.adapters.pop(name)
    for mod_path in info.linear_modules:
        mod = model.get_submodule(mod_path)
        assert isinstance(mod, DeltaLinear)
        mod.delete_adapter(name)
        if not len(mod.adapters):
            _replace(model, mod_path, mod.base_layer)
    if state.active == name:
        state.active = None
    if state.batch is not None and name in state.batch:
        state.batch = None
    state._mixed_ok.clear()
    _sync(model)
    still = {t for a in state.adapters.values() for t in a.raw}
    for tname in list(state.base_raw):
        if tname not in still:
            del state.base_raw[tname]


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, new)


def merge_and_unload(model: nn.Module, name: str) -> nn.Module:
    """Turn the model into the rebuilt fine-tune ``name`` (weights materialized, all adapters removed).

    Merged weights are computed like :meth:`Delta.reconstruct` — ``dtype(float32(W) + Δ̂)`` — into
    *new* tensors, so the base weights that other models may share are not modified. Returns
    ``model`` with plain ``nn.Linear`` layers.
    """
    state = resident_state(model)
    if name not in state.adapters:
        raise KeyError(f"no adapter named {name!r}; attached: {list(state.adapters)}")
    info = state.adapters[name]
    set_adapter(model, name)  # swaps the adapter's raw tensors in
    for mod_path, mod in list(_delta_linears(model)):
        base = mod.base_layer
        if name in mod.adapters:
            a = mod.adapters[name]
            w = base.weight
            merged = get_codec(a.codec_name).reconstruct(
                {k: v.cpu() for k, v in a.stored().items()}, a.params, w.detach().cpu(), tuple(a.shape), dtype_from_name(a.dtype_name)
            )
            new = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
            new.weight = nn.Parameter(merged.to(device=w.device, dtype=w.dtype), requires_grad=w.requires_grad)
            if base.bias is not None:
                new.bias = base.bias
            base = new
        _replace(model, mod_path, base)
    object.__setattr__(model, _STATE_ATTR, ResidentState())
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter and restore the plain base model (base tensors swapped back)."""
    for name in list(resident_state(model).adapters):
        delete_adapter(model, name)
    return model


def adapter_nbytes(model: nn.Module, name: str) -> dict[str, int]:
    """Memory of one adapter: ``delta_modules`` (its stored deltas), ``scales`` (the BitDelta part of
    that in float32 scales), ``raw`` (its exact non-shareable tensors) and ``covered_weights`` (bytes of
    the base Linear weights its deltas apply to, for the ratio)."""
    state = resident_state(model)
    info = state.adapters[name]
    delta_b = scales_b = covered = 0
    for mod_path in info.linear_modules:
        mod = model.get_submodule(mod_path)
        assert isinstance(mod, DeltaLinear)
        a = mod.adapters[name]
        delta_b += sum(b.numel() * b.element_size() for b in a.buffers())
        if isinstance(a, _BitDeltaAdapter):
            scales_b += a.scale.numel() * a.scale.element_size()
        if isinstance(a, _GenericAdapter) and a._cache is not None:
            delta_b += a._cache.numel() * a._cache.element_size()
        covered += mod.weight.numel() * mod.weight.element_size()
    raw_b = sum(t.numel() * t.element_size() for t in info.raw.values())
    return {"delta_modules": delta_b, "scales": scales_b, "raw": raw_b, "covered_weights": covered}


def load_resident(base_path: str | Path, deltas: dict[str, str | Path | Delta], torch_dtype: torch.dtype | None = None,
                  *, check_base: bool = True, **model_kwargs: Any) -> nn.Module:
    """Load the base once with ``AutoModelForCausalLM.from_pretrained`` and attach every delta under its key.

    ``torch_dtype`` ``None`` keeps the checkpoint's dtype (needed for the sha256 base check).
    The first delta becomes the active adapter.
    """
    from transformers import AutoModelForCausalLM

    kwargs = dict(model_kwargs)
    kwargs["dtype"] = torch_dtype if torch_dtype is not None else "auto"
    model = AutoModelForCausalLM.from_pretrained(str(base_path), **kwargs)
    model.eval()
    for name, delta in deltas.items():
        attach_delta(model, delta, name, check_base=check_base)
    return model


__all__ = [
    "CHUNK_ROWS",
    "DeltaLinear",
    "MixedAdapterError",
    "ResidentState",
    "active_adapter",
    "adapter_nbytes",
    "attach_delta",
    "delete_adapter",
    "disable_adapters",
    "is_delta_codec",
    "list_adapters",
    "load_resident",
    "merge_and_unload",
    "resident_state",
    "set_adapter",
    "tensor_sha256",
    "unload",
    "unpack_pm1",
    "use_adapters",
]
