"""Per-row routing of the tensors a delta changes outside ``nn.Linear`` weights.

* :class:`DeltaEmbedding` wraps an ``nn.Embedding`` whose weight is delta-coded: the lookup is
  ``base(ids) + Δ̂[ids]`` with only the looked-up rows of the compressed delta decoded (BitDelta
  signs, codebook rows). Its adapter objects are shared with the tied LM head's
  :class:`~deltahub.resident.layers.DeltaLinear` (``h @ (E + Δ̂)ᵀ = h @ Eᵀ + h @ Δ̂ᵀ``): one copy.
* :class:`RawRouted` wraps any module holding exactly stored (``raw``) tensors of some adapter
  (RMSNorm weights, a raw embedding…): with one adapter for every row the model's tensors are
  swapped (no overhead); in a mixed batch each row group runs the module with its adapter's
  tensors (``torch.func.functional_call``), so rows of different full fine-tunes each get their
  own norms and embeddings.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from .layers import AdapterLayer, RoutedModule


class DeltaEmbedding(AdapterLayer):
    """An ``nn.Embedding`` plus resident compressed deltas of its weight, looked up per row."""

    def __init__(self, base_layer: nn.Embedding) -> None:
        if not isinstance(base_layer, nn.Embedding):
            raise TypeError(f"DeltaEmbedding wraps an nn.Embedding, got {type(base_layer).__name__}")
        super().__init__(base_layer)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def num_embeddings(self) -> int:
        return self.base_layer.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base_layer.embedding_dim

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The decoded delta of the embedding matrix ``[num_embeddings, dim]`` in the weight's dtype (PEFT's name)."""
        return self.adapters[adapter].dense(self.base_layer.weight.dtype)

    def _lookup(self, name: str, ids: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """``dtype(float32(E[ids]) + Δ̂[ids])``: the rebuilt embedding's rows, rounded once like the rebuild."""
        flat = ids.reshape(-1)
        uniq, inverse = torch.unique(flat, return_inverse=True)
        rows = self.adapters[name].rows(uniq.to(torch.int64)).to(base.device)
        d = rows.index_select(0, inverse).reshape(*ids.shape, -1)
        acc = torch.promote_types(base.dtype, torch.float32)  # float64 models stay float64
        return (base.to(acc) + d.to(acc)).to(base.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Base lookup plus each row's adapter rows."""
        if not len(self.adapters):
            return self.base_layer(ids)
        ids = self.broadcast_rows(ids)
        y = self.base_layer(ids)
        sel = self.selection(ids.shape[0] if ids.dim() >= 2 else 0)
        if isinstance(sel, tuple):
            y = y.clone()
            for name, idx in sel:
                if name is not None and name in self.adapters:
                    idx = idx.to(ids.device)
                    y[idx] = self._lookup(name, ids.index_select(0, idx), y.index_select(0, idx))
            return y
        if sel is None or sel not in self.adapters:
            return y
        return self._lookup(sel, ids, y)

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, active={self.active_adapter!r}"


class RawRouted(RoutedModule):
    """A module with per-adapter exact tensors (``raw``), applied per row group in a mixed batch.

    ``raw[adapter]`` maps the module's own tensor names (``weight``…) to that adapter's tensor;
    the model-level state swaps them in when one adapter serves every row.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.raw: dict[str, dict[str, torch.Tensor]] = {}

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_layer"), name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The base module; in a mixed batch once per adapter row group, with that adapter's tensors."""
        if self.batch_adapters is not None:
            x = self.broadcast_rows(x)
        sel = self.selection(x.shape[0] if x.dim() >= 2 else 0) if self.batch_adapters is not None else None
        if not isinstance(sel, tuple) or all(n is None or n not in self.raw for n, _ in sel):
            return self.base_layer(x, *args, **kwargs)
        out: torch.Tensor | None = None
        for name, idx in sel:
            idx = idx.to(x.device)
            part = x.index_select(0, idx)
            tensors = self.raw.get(name) if name is not None else None
            y = self._call_with(tensors, part, args, kwargs) if tensors else self.base_layer(part, *args, **kwargs)
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out[idx] = y
        assert out is not None
        return out

    def _call_with(self, tensors: dict[str, torch.Tensor], x: torch.Tensor, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> Any:
        """The base module on ``x`` with ``tensors`` in place of its own. Its direct parameters and buffers are
        swapped in its dicts for the call and put back after (``functional_call`` does the same through a
        reparametrization that costs ~100x more per call, which decode steps of a mixed batch pay per norm);
        nested names go through ``functional_call``."""
        base = self.base_layer
        if any("." in k or (k not in base._parameters and k not in base._buffers) for k in tensors):
            return functional_call(base, tensors, (x, *args), kwargs)
        saved: list[tuple[dict[str, Any], str, Any]] = []
        try:
            for k, t in tensors.items():
                store = base._parameters if k in base._parameters else base._buffers
                saved.append((store, k, store[k]))
                store[k] = t
            return base(x, *args, **kwargs)
        finally:
            for store, k, old in reversed(saved):
                store[k] = old

    def extra_repr(self) -> str:
        return f"adapters={list(self.raw)}"
