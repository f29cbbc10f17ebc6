"""Per-row routing of the tensors a delta changes outside ``nn.Linear`` weights.

* :class:`DeltaEmbedding` wraps an ``nn.Embedding`` whose weight is delta-coded: the lookup is
  ``base(ids) + Δ̂[ids]`` with only the looked-up rows of the compressed delta decoded (BitDelta
  signs, codebook rows). Its adapter objects are shared with the tied LM head's
  :class:`~deltahub.resident.layers.DeltaLinear` (``h @ (E + Δ̂)ᵀ = h @ Eᵀ + h @ Δ̂ᵀ``): one copy.
* :class:`RawRouted` wraps any module holding exactly stored (``raw``) tensors of some adapter
  (RMSNorm weights, a raw embedding…): with one adapter for every row the model's tensors are
  swapped (no overhead); in a mixed batch the module runs once with per-row tensors where it
  broadcasts them (norm weights: checked bit-exact against the per-group way on the first mixed
  call), else once per row group with that adapter's tensors, so rows of different full
  fine-tunes each get their own norms and embeddings.
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
        #: Whether a mixed batch runs the module once with per-row tensors (None: not yet checked; see forward).
        self.stackable: bool | None = None
        #: Per selection (by id): (selection, (row -> group index, each routed tensor stacked over the groups) or False).
        self.row_stacks: dict[Any, Any] = {}

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_layer"), name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The base module; in a mixed batch with each row's adapter tensors: one call with per-row tensors
        where the module broadcasts them (norm weights; checked bit-exact once), else once per row group."""
        base = self._modules["base_layer"]
        assert base is not None
        if self.batch_adapters is None or self.disabled:
            return base(x, *args, **kwargs)
        x = self.broadcast_rows(x)
        sel = self.selection(x.shape[0] if x.dim() >= 2 else 0)
        if not isinstance(sel, tuple) or all(n is None or n not in self.raw for n, _ in sel):
            return base(x, *args, **kwargs)
        if self.stackable is not False:
            per_row = self._per_row_tensors(sel, x)
            if per_row is not None:
                if self.stackable:
                    return self._call_with(per_row, x, args, kwargs)
                # first mixed call: both ways, and the one-call way is kept only when it gives the same bits
                want = self._by_groups(sel, x, args, kwargs)
                try:
                    got = self._call_with(per_row, x, args, kwargs)
                    self.stackable = isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor) \
                        and got.shape == want.shape and torch.equal(got, want)
                except Exception:  # noqa: BLE001 - a module that does not broadcast its tensors: per group
                    self.stackable = False
                return want
        return self._by_groups(sel, x, args, kwargs)

    def _by_groups(self, sel: tuple[tuple[str | None, torch.Tensor], ...], x: torch.Tensor, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> Any:
        """The base module once per adapter row group, with that adapter's tensors."""
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

    def clear_cache(self) -> None:
        """Forget the per-row tensor stacks (the selection or the attached tensors changed)."""
        self.row_stacks.clear()

    def _per_row_tensors(self, sel: tuple[tuple[str | None, torch.Tensor], ...],
                         x: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """Each routed tensor as one per batch row, shaped to broadcast against ``x`` (``[rows, 1, …, dim]``), when
        every routed tensor is a vector of ``x``'s feature size in one dtype (norm weights and biases); else None.
        The distinct tensors are stacked once per selection (``row_stacks``), then picked per row."""
        entry = self.row_stacks.get(id(sel))  # sel: row_groups' cached tuple, kept alive in the entry
        if entry is None or entry[0] is not sel:
            entry = self.row_stacks[id(sel)] = (sel, self._stack_plan(sel, x))
        plan = entry[1]
        if plan is False:
            return None
        gidx, stacks = plan
        shape = (x.shape[0], *([1] * (x.dim() - 2)), x.shape[-1])
        return {k: t.index_select(0, gidx).view(shape) for k, t in stacks.items()}

    def _stack_plan(self, sel: tuple[tuple[str | None, torch.Tensor], ...],
                    x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | bool:
        base = self.base_layer
        keys = sorted({k for name, _ in sel if name is not None for k in self.raw.get(name, {})})
        if x.dim() < 2 or not keys:
            return False
        stacks: dict[str, torch.Tensor] = {}
        for k in keys:
            own = base._parameters.get(k, base._buffers.get(k))
            if own is None:
                return False
            parts = [self.raw.get(name, {}).get(k, own) if name is not None else own for name, _ in sel]
            if any(t.dim() != 1 or t.shape[0] != x.shape[-1] or t.dtype != own.dtype or t.device != x.device
                   for t in parts):
                return False
            stacks[k] = torch.stack([t.detach() for t in parts])
        gidx = torch.empty(sum(idx.numel() for _, idx in sel), dtype=torch.int64, device=x.device)
        for g, (_, idx) in enumerate(sel):
            gidx[idx.to(x.device)] = g
        return gidx, stacks

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
