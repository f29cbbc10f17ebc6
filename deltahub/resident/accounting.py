"""Memory accounting of resident adapters."""

from __future__ import annotations

import torch
from torch import nn

from .layers import DeltaLinear, _BitDeltaAdapter, _GenericAdapter
from .model import resident_state
from .routing import DeltaEmbedding


def _nbytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of distinct tensors (a tied LM head shares its embedding's adapter, an alias its target's: counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), t.numel() * t.element_size())
    return sum(seen.values())


def adapter_nbytes(model: nn.Module, name: str) -> dict[str, int]:
    """Memory of one adapter: ``delta_modules`` (its resident deltas: Linear, embedding and tied LM
    head, counted once), ``scales`` (the BitDelta part of that in float32 scales), ``raw`` (its exact
    non-shareable tensors), ``caches`` (speed caches: ``DELTAHUB_RESIDENT_CACHE``'s int8 / dense matrices, and
    the undo record while it is merged) and ``covered_weights`` (bytes of the base weights its deltas apply to)."""
    state = resident_state(model)
    info = state.adapters[name]
    bufs: list[torch.Tensor] = []
    scales: list[torch.Tensor] = []
    caches: list[torch.Tensor] = []
    covered: dict[int, int] = {}
    for mod_path in [*info.linear_modules, *info.embedding_modules]:
        mod = model.get_submodule(mod_path)
        assert isinstance(mod, DeltaLinear | DeltaEmbedding)
        a = mod.adapters[name]
        bufs += list(a.buffers())
        if isinstance(a, _BitDeltaAdapter):
            scales.append(a.scale)
        if isinstance(a, _GenericAdapter) and a._cache is not None:
            bufs.append(a._cache)
        caches += list(a.kernel_cache.values())  # DELTAHUB_RESIDENT_CACHE (int8 / dense)
        covered[id(mod.weight)] = mod.weight.numel() * mod.weight.element_size()
    raw_b = _nbytes(list(info.raw.values()))  # a tied pair stored under two names (format 1.3 alias): one tensor
    if state.merged == name:  # the exact undo record of merge_adapter
        caches += [t for u in state.merge_undo for t in (u.index, u.values)]
    return {"delta_modules": _nbytes(bufs), "scales": _nbytes(scales), "raw": raw_b, "caches": _nbytes(caches),
            "covered_weights": sum(covered.values())}


def delta_memory(model: nn.Module, name: str | None = None) -> dict[str, int] | dict[str, dict[str, int]]:
    """Bytes one attached delta costs (``total`` = its resident deltas + its exact tensors + its caches, plus
    the :func:`adapter_nbytes` parts); without ``name``, a dict of that for every adapter."""
    if name is None:
        return {n: delta_memory(model, n) for n in resident_state(model).adapters}  # type: ignore[misc]
    nb = adapter_nbytes(model, name)
    return {"total": nb["delta_modules"] + nb["raw"] + nb["caches"], **nb}
