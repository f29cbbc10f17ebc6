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

from ..codecs._bits import unpack_pm1
from ..format.io import sha256_of as tensor_sha256
from .accounting import adapter_nbytes, delta_memory
from .layers import BASE_ADAPTER, CHUNK_ROWS, DeltaLinear, MixedAdapterError, RoutedModule, is_delta_codec, row_groups
from .loading import attach_delta, load_resident
from .model import (ResidentState, active_adapter, delete_adapter, disable_adapters, forward, generate, list_adapters,
                    merge_and_unload, resident_state, set_adapter, unload, use_adapters)
from .routing import DeltaEmbedding, RawRouted

__all__ = [
    "BASE_ADAPTER",
    "CHUNK_ROWS",
    "DeltaEmbedding",
    "DeltaLinear",
    "RawRouted",
    "RoutedModule",
    "delta_memory",
    "forward",
    "generate",
    "row_groups",
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
