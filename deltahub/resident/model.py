"""Per-model adapter state: which adapters are attached and selected, raw-tensor swapping, and
the operations on a whole model (select, mix per row, delete, merge, unload)."""

from __future__ import annotations

import functools

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..format.io import pipelined
from . import _cpu
from .layers import BASE_ADAPTER, CallInfo, DeltaLinear, MixedAdapterError, RoutedModule
from .routing import DeltaEmbedding, RawRouted

_STATE_ATTR = "_deltahub_resident"


@dataclass
class _AdapterInfo:
    """What one attached delta added to the model."""

    name: str
    source: str
    linear_modules: list[str] = field(default_factory=list)
    #: DeltaEmbedding paths holding this adapter's compressed embedding delta.
    embedding_modules: list[str] = field(default_factory=list)
    #: RawRouted paths holding this adapter's raw tensors (for per-row routing).
    routed_modules: list[str] = field(default_factory=list)
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
    #: generate(): the batch may be each named row repeated k times (beams / return sequences).
    expand: bool = False
    #: Raw tensors that cannot be routed per row (inside a delta-wrapped layer other than a Linear bias,
    #: which DeltaLinear routes itself; e.g. an embedding module's other buffers).
    unroutable: set[str] = field(default_factory=set)
    #: The base checkpoint directory the model was loaded from (``load_resident``, or a local
    #: ``model.name_or_path``): exact tensors stored as XOR against the base's bits are rebuilt from the
    #: checkpoint's own bits when the model holds the base in another dtype (served in bf16 / fp16).
    base_dir: str | None = None
    #: The running model call (batch size, native flags), shared with every routed module; see _record_rows.
    call: CallInfo = field(default_factory=CallInfo)
    #: sha256 of base tensors already checked, by name (the base is hashed once for all its deltas).
    base_digests: dict[str, str] = field(default_factory=dict)
    _mixed_ok: dict[frozenset[str | None], str | None] = field(default_factory=dict)
    #: The adapter merged into the shared base weights (:func:`merge_adapter`), and how to undo it exactly.
    merged: str | None = None
    merge_undo: list[_MergeUndo] = field(default_factory=list)


@dataclass
class _MergeUndo:
    """Exact undo of one in-place merge ``W <- dtype(float32(W) + Δ̂)``: ``dtype(float32(W_merged) - Δ̂)`` gives
    ``W`` back except at a few elements (rounding), whose original values are kept here."""

    weight: torch.Tensor
    delta: Any  # the adapter object (decodes Δ̂ again on undo)
    index: torch.Tensor
    values: torch.Tensor


def resident_state(model: nn.Module) -> ResidentState:
    """The model's :class:`ResidentState` (created empty on first use)."""
    state = model.__dict__.get(_STATE_ATTR)
    if state is None:
        state = ResidentState()
        object.__setattr__(model, _STATE_ATTR, state)
        model.register_forward_pre_hook(functools.partial(_record_rows, state.call), with_kwargs=True)
        model.register_forward_hook(functools.partial(_end_call, state.call), always_call=True)
    return state


def _record_rows(call: CallInfo, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Forward pre-hook of the resident model: the call's batch size (``input_ids`` / ``inputs_embeds``) and the
    native kernels' flags (the environment read once per call, not once per layer) into ``call``."""
    t = kwargs.get("input_ids")
    if t is None:
        t = kwargs.get("inputs_embeds")
    if t is None and args and isinstance(args[0], torch.Tensor):
        t = args[0]
    call.rows = int(t.shape[0]) if isinstance(t, torch.Tensor) and t.dim() >= 1 else 0
    call.native = _cpu.call_flags()


def _end_call(call: CallInfo, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
    """Forward hook (also after an exception): layers called on their own read the environment again."""
    call.native = None


def _walk_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by its *base* name (DeltaLinear's ``base_layer`` level removed, deltas skipped).

    Tied parameters appear under each of their names (``lm_head.weight`` and ``model.embed_tokens.weight``).
    """
    out: dict[str, torch.Tensor] = {}

    def walk(mod: nn.Module, prefix: str) -> None:
        if isinstance(mod, RoutedModule):
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


def _routed(model: nn.Module) -> Iterator[tuple[str, RoutedModule]]:
    for name, mod in model.named_modules():
        if isinstance(mod, RoutedModule):
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
    """Raw tensors for a mixed batch: the base's (routed modules apply each row's own); raise when
    tensors that cannot be routed per row (``state.unroutable``) differ between the selected adapters."""
    selected = frozenset(None if n == "__base__" else n for n in names)
    if selected in state._mixed_ok:
        return state._mixed_ok[selected]
    ordered = list(dict.fromkeys(None if n == "__base__" else n for n in names))
    for tname in state.unroutable:
        first = _raw_for(state, ordered[0], tname)
        for other in ordered[1:]:
            t = _raw_for(state, other, tname)
            if t is not first and not (t.shape == first.shape and torch.equal(t, first)):
                raise MixedAdapterError(
                    f"adapters {ordered[0]!r} and {other!r} have different {tname!r} (an exact, non-shareable tensor "
                    "inside a delta-wrapped layer); they cannot share one mixed batch — run them in separate batches"
                )
    state._mixed_ok[selected] = ordered[0]
    return ordered[0]


def _sync(model: nn.Module) -> None:
    """Push the model's selection to every DeltaLinear and swap in the matching raw tensors."""
    state = resident_state(model)
    if state.merged is not None and (state.disabled or state.batch is not None or state.active != state.merged):
        _unmerge(model, state)
    if state.disabled:
        raw_source: str | None = None
    elif state.batch is not None:
        raw_source = _mixed_raw_source(state, state.batch)
    else:
        raw_source = state.active
    for _, mod in _routed(model):
        mod.disabled = state.disabled
        # a merged adapter is in the base weights: its Linear / embedding deltas are not added again
        merged = state.merged is not None and isinstance(mod, DeltaLinear | DeltaEmbedding)
        mod.active_adapter = None if merged else state.active
        mod.batch_adapters = None if state.batch is None else list(state.batch)
        mod.batch_expand = state.expand
        mod.call_info = state.call
        if isinstance(mod, RawRouted):
            mod.clear_cache()
    tensors = _walk_tensors(model)
    mixed = state.batch is not None and not state.disabled
    for tname in state.base_raw:
        # mixed batch: routed tensors stay the base's (RawRouted applies each row group's own)
        source = None if mixed and tname not in state.unroutable else raw_source
        _set_tensor_data(tensors[tname], _raw_for(state, source, tname))


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the attached adapters, in attach order."""
    return list(resident_state(model).adapters)


def active_adapter(model: nn.Module) -> str | None:
    """The adapter applied to every row (``None``: base)."""
    return resident_state(model).active


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Apply adapter ``name`` to every row from now on (``None`` or ``"__base__"``: the base model)."""
    state = resident_state(model)
    name = None if name == BASE_ADAPTER else name
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
    """Context: batch row ``i`` uses adapter ``adapter_names[i]`` (``None`` or ``"__base__"``: base) — mixed-batch inference.

    Every resident layer groups the rows by adapter: :class:`DeltaLinear` adds each group's delta,
    :class:`DeltaEmbedding` each group's embedding rows, :class:`RawRouted` runs norms (and other
    exactly stored tensors) with each group's own tensors — so row ``i`` gets the logits of
    fine-tune ``adapter_names[i]`` alone. Inputs inside the context must have ``len(adapter_names)``
    rows (dim 0), else :class:`MixedAdapterError`. A changed Linear bias next to a delta is added
    per row group by :class:`DeltaLinear`; the only tensors that cannot differ between the selected
    adapters are other raw tensors inside a delta-wrapped layer (rare: none in the usual architectures).
    """
    with _route(model, adapter_names, expand=False):
        yield model


@contextmanager
def _route(model: nn.Module, adapter_names: list[str | None], *, expand: bool) -> Iterator[None]:
    state = resident_state(model)
    names = list(adapter_names)
    unknown = [n for n in names if n is not None and n != BASE_ADAPTER and n not in state.adapters]
    if unknown:
        raise MixedAdapterError(f"unknown adapter(s) {sorted(set(unknown))}; attached: {list(state.adapters)}")
    if not names:
        raise MixedAdapterError("use_adapters() needs one adapter name (or None) per batch row, got an empty list")
    old = (state.batch, state.expand)
    state.batch, state.expand = names, expand
    try:
        _sync(model)
    except Exception:
        state.batch, state.expand = old
        raise
    try:
        yield
    finally:
        state.batch, state.expand = old
        _sync(model)


def generate(model: nn.Module, *args: Any, adapter_names: list[str | None] | None = None, **kwargs: Any) -> Any:
    """``model.generate(...)`` with adapter ``adapter_names[i]`` for input row ``i`` (PEFT's ``adapter_names``).

    Beam search and ``num_return_sequences`` repeat each input row ``k`` times; the names are
    expanded the same way (row ``i`` of the ``k``-fold batch uses ``adapter_names[i // k]``).
    Without ``adapter_names`` the current selection (:func:`set_adapter`) is used.
    """
    if adapter_names is None:
        return model.generate(*args, **kwargs)
    with _route(model, adapter_names, expand=True):
        return model.generate(*args, **kwargs)


def forward(model: nn.Module, *args: Any, adapter_names: list[str | None] | None = None, **kwargs: Any) -> Any:
    """``model(...)`` with adapter ``adapter_names[i]`` for batch row ``i`` (``None`` / ``"__base__"``: base)."""
    if adapter_names is None:
        return model(*args, **kwargs)
    with _route(model, adapter_names, expand=False):
        return model(*args, **kwargs)


def merge_adapter(model: nn.Module, name: str) -> None:
    """Serve one adapter at the base's speed: write its deltas into the shared base weights in place (PEFT's
    ``merge_adapter``), so forward passes run the plain layers with no delta matmul and no extra weight memory.

    Merged weights are ``dtype(float32(W) + Δ̂)``, bit-identical to the rebuilt fine-tune's. The merge is
    undone exactly (:func:`unmerge_adapter`, or automatically when another adapter, a mixed batch, the
    disabled base or a new attach is asked for): ``dtype(float32(W_merged) - Δ̂)`` gives ``W`` back except at
    the few elements where rounding differs, whose original values are kept (0.3-1% of the elements on the
    real pair: ~1-2% of the merged weights' memory). Switching costs one decode of the adapter per weight.
    Do not use it while another model shares these base weights (they change in place).
    """
    state = resident_state(model)
    if name not in state.adapters:
        raise KeyError(f"no adapter named {name!r}; attached: {list(state.adapters)}")
    if state.merged == name:
        return
    set_adapter(model, name)  # unmerges any other adapter; swaps this adapter's raw tensors (norms) in
    todo: dict[int, tuple[torch.Tensor, Any]] = {}  # by id of the base weight: tied weights are merged once
    for _, mod in _routed(model):
        if isinstance(mod, DeltaLinear | DeltaEmbedding) and name in mod.adapters:
            todo.setdefault(id(mod.base_layer.weight), (mod.base_layer.weight, mod.adapters[name]))

    def prepare(item: tuple[torch.Tensor, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w, adapter = item
        with torch.no_grad():
            d = adapter.dense(torch.float32).to(w.device)
            orig = w.detach()
            merged = (orig.to(torch.float32) + d).to(w.dtype)
            back = (merged.to(torch.float32) - d).to(w.dtype)
            index = (_bits(back) != _bits(orig)).reshape(-1).nonzero().squeeze(1)
            values = orig.reshape(-1).index_select(0, index)
        return merged, (index.to(torch.int32) if orig.numel() < 2**31 else index), values  # 4 bytes per kept index

    state.merged = name  # so that a failure part-way is undone by _unmerge
    try:
        # decode + add per weight on all cores (GIL-free torch ops); weights are written in order, one at a time
        for (w, adapter), (merged, small, values) in pipelined(list(todo.values()), prepare):
            state.merge_undo.append(_MergeUndo(w, adapter, small, values))
            with torch.no_grad():
                w.detach().copy_(merged)
    except BaseException:
        _unmerge(model, state)
        raise
    _sync(model)


def unmerge_adapter(model: nn.Module) -> None:
    """Undo :func:`merge_adapter` exactly (the base weights get their original bits back); the adapter stays active."""
    state = resident_state(model)
    if state.merged is not None:
        _unmerge(model, state)
        _sync(model)


def _unmerge(model: nn.Module, state: ResidentState) -> None:
    def restore(u: _MergeUndo) -> torch.Tensor:
        with torch.no_grad():
            w = u.weight.detach()
            d = u.delta.dense(torch.float32).to(w.device)
            back = (w.to(torch.float32) - d).to(w.dtype).reshape(-1)
            back.index_copy_(0, u.index.long(), u.values)
            return back.view(w.shape)

    # each record touches its own weight (tied weights were merged once): decoded on all cores, written in order
    for u, back in pipelined(list(reversed(state.merge_undo)), restore):
        with torch.no_grad():
            u.weight.detach().copy_(back)
    state.merge_undo.clear()
    state.merged = None


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor as same-width integers (so -0.0 != 0.0 and NaN payloads compare)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove one adapter; layers left without adapters go back to their plain base modules (the base is untouched)."""
    state = resident_state(model)
    if name not in state.adapters:
        raise KeyError(f"no adapter named {name!r}; attached: {list(state.adapters)}")
    if state.merged is not None:
        _unmerge(model, state)
    info = state.adapters.pop(name)
    for mod_path in [*info.linear_modules, *info.embedding_modules]:
        mod = model.get_submodule(mod_path)
        assert isinstance(mod, DeltaLinear | DeltaEmbedding)
        mod.delete_adapter(name)
    for mod_path, mod in list(_routed(model)):
        if isinstance(mod, DeltaLinear):
            mod.raw_bias.pop(name, None)
        if isinstance(mod, DeltaLinear | DeltaEmbedding) and not len(mod.adapters) and not getattr(mod, "raw_bias", None):
            _replace(model, mod_path, mod.base_layer)
    for mod_path in info.routed_modules:
        mod = model.get_submodule(mod_path)
        assert isinstance(mod, RawRouted)
        mod.raw.pop(name, None)
        if not mod.raw:
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
            state.unroutable.discard(tname)


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
    if state.merged is not None:
        _unmerge(model, state)
    set_adapter(model, name)  # swaps the adapter's raw tensors in
    merged: dict[int, nn.Parameter] = {}  # by id of the base weight: tied weights stay tied
    for mod_path, mod in list(_routed(model)):
        base = mod.base_layer
        if isinstance(mod, DeltaLinear | DeltaEmbedding) and name in mod.adapters:
            w = base.weight
            if id(w) not in merged:
                d = mod.adapters[name].dense(torch.float32).to(w.device)
                merged[id(w)] = nn.Parameter((w.detach().to(torch.float32) + d).to(w.dtype), requires_grad=w.requires_grad)
            base.weight = merged[id(w)]
        _replace(model, mod_path, base)
    object.__setattr__(model, _STATE_ATTR, ResidentState())
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter and restore the plain base model (base tensors swapped back)."""
    for name in list(resident_state(model).adapters):
        delete_adapter(model, name)
    return model
