"""Per-model adapter state: which adapters are attached and selected, raw-tensor swapping, and
the operations on a whole model (select, mix per row, delete, merge, unload)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..codecs import get_codec
from ..format.spec import dtype_from_name
from .layers import DeltaLinear, MixedAdapterError

_STATE_ATTR = "_deltahub_resident"


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
