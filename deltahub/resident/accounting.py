"""Memory accounting of resident adapters."""

from __future__ import annotations

from torch import nn

from .layers import DeltaLinear, _BitDeltaAdapter, _GenericAdapter
from .model import resident_state


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

