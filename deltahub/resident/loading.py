"""Attaching deltas to a loaded base model (checked against the base first), and loading a base with deltas."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..codecs import matrix_view_shape
from ..codecs.unchanged import same_bits
from ..delta import Delta, check_base_digest, check_base_shape
from ..errors import BaseMismatchError, ShapeMismatchError
from ..format.io import sha256_of as tensor_sha256
from ..format.manifest import TensorEntry
from ..format.spec import dtype_name
from .layers import CHUNK_ROWS, DeltaLinear, _BitDeltaAdapter, _check_adapter_name, is_delta_codec
from .model import ResidentState, _AdapterInfo, _sync, _walk_tensors, resident_state


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
        check_base_shape(m, name, t.shape, path=delta.directory, why="; resident adapters cannot change shapes")
        if not check_base or entry.base_sha256 is None:
            continue
        if dtype_name(t.dtype) != entry.dtype:
            skipped.append(name)
            continue
        base_t = state.base_raw.get(name, t)
        check_base_digest(m, name, tensor_sha256(base_t), path=delta.directory)
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
            rebuilt = _rebuilt_if_changed(d, name, entry, state.base_raw.get(name, tensors[name]))
            if rebuilt is not None:
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

    _install(model, state, _AdapterInfo(adapter_name, str(d.directory)), linears, raw, tensors,
             chunk_rows=chunk_rows, cache_decoded=cache_decoded)
    return model


def _rebuilt_if_changed(d: Delta, name: str, entry: TensorEntry, base_t: torch.Tensor) -> torch.Tensor | None:
    """The exact rebuilt tensor ``name`` in the model's dtype and device, or None when it equals the base bit for bit."""
    if entry.codec == "raw" and entry.params.get("mode") == "xor" and dtype_name(base_t.dtype) != entry.dtype:
        raise ShapeMismatchError(
            f"tensor {name!r} is stored as an exact XOR against a {entry.dtype} base, but the model holds it as "
            f"{dtype_name(base_t.dtype)}; load the base with torch_dtype={entry.dtype} to attach this delta",
            path=d.directory,
        )
    rebuilt = d.reconstruct(name, base_t.detach().cpu()).to(dtype=base_t.dtype, device=base_t.device)
    return None if same_bits(rebuilt, base_t.detach()) else rebuilt


def _install(model: nn.Module, state: ResidentState, info: _AdapterInfo,
             linears: list[tuple[str, TensorEntry, dict[str, torch.Tensor]]], raw: dict[str, torch.Tensor],
             tensors: dict[str, torch.Tensor], *, chunk_rows: int, cache_decoded: bool) -> None:
    """Modify the model (everything was checked): wrap or extend the Linear layers, record the raw tensors, select."""
    adapter_name = info.name
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

