"""Resident deltas: keep one base model in memory and serve several fine-tunes from it (PEFT-style).

:func:`Delta.to_model <deltahub.delta.Delta.to_model>` rebuilds a full fine-tune, which costs a
whole model per fine-tune. Here the base is loaded once and each delta is *attached* under an
adapter name instead:

* every ``nn.Linear`` (or GPT-2 ``Conv1D``, weight stored ``[in, out]``: ``fan_in_fan_out``) whose
  weight is coded with a delta codec (``bitdelta``, ``dare``,
  ``topk-ternary``, …) is wrapped in a :class:`DeltaLinear` that shares the base layer (its
  weight is never copied) and holds, per adapter, the delta **in its stored, compressed form**.
  For BitDelta that is the packed sign bits (uint8) plus float32 scales, about 1/16 of the fp16
  weight (1/32 of fp32). The forward pass is ``base(x) + x @ Δ̂ᵀ`` where ``Δ̂`` is exactly the
  decoded delta of ``format_spec.md``; for BitDelta the ±1 sign matrix is unpacked in ``x``'s
  dtype a chunk of output rows at a time (bounded temporary memory, never a permanent dense
  weight) and the scales are applied per row / tensor after the matmul or per group before it.
  Other delta codecs keep their stored tensors and decode with their codec on the fly (or once,
  cached, with ``cache_decoded=True``).
* a delta-coded embedding matrix (and the LM head tied to it) becomes a :class:`DeltaEmbedding`
  (and a :class:`DeltaLinear` sharing the same adapter object): lookups decode only the rows of
  the looked-up ids; the head adds ``h @ Δ̂ᵀ``. Codecs whose decoded delta has at most 16 distinct
  values (DeltaDQ k-means, ternary) are decoded once at attach into a 1-bit non-zero map plus
  4-bit codebook indices (``_CodebookAdapter``), so the forward pass never re-runs entropy decoding.
* tensors coded ``raw`` (norms, biases…) or delta-coded but neither Linear nor embedding weights
  are rebuilt exactly and kept per adapter (their full size per adapter); their modules become
  :class:`RawRouted`: with one adapter for every row the tensors are swapped in, in a mixed batch
  each row group runs the module with its own tensors. A changed bias of a delta-wrapped Linear
  (Qwen2's q/k/v biases) is kept per adapter in :class:`DeltaLinear` and added per row group.
  ``unchanged`` tensors cost nothing.

Selecting adapters: :func:`set_adapter` (one adapter for every row; ``None`` = base),
:func:`disable_adapters` (context: base only), :func:`use_adapters` / :func:`forward` (one adapter
per batch row, PEFT's ``adapter_names``; ``None`` or ``"__base__"`` = base) and :func:`generate`
(the same for ``model.generate``, names expanded for beams / ``num_return_sequences``). Every row
gets what its fine-tune gives alone. :class:`MixedAdapterError`: unknown names, a row count that
does not match, or selected adapters differing in a raw tensor (other than a Linear bias) inside a
delta-wrapped layer.

Exactness: with adapter ``A`` active each wrapped layer computes ``x Wᵀ + b + x Δ̂ᵀ``, which equals
``x (W + Δ̂)ᵀ + b`` up to float rounding of a different summation order (tested in float64). The
full rebuild rounds ``W + Δ̂`` to the checkpoint dtype once, so float32 results agree to ~1e-6
relative. :func:`merge_and_unload` produces the rebuilt weights bit-for-bit.

Speed: the delta matmuls cost time on every forward pass. When one adapter serves every row,
:func:`merge_adapter` writes its deltas into the shared base weights in place (the rebuilt weights,
bit for bit) so the plain layers run at the base's speed; :func:`unmerge_adapter` (or selecting
anything else) restores the base bit-exactly from ``W_merged - Δ̂`` plus the few elements where
rounding differs.
"""

from __future__ import annotations

from ..codecs._bits import unpack_pm1
from ..format.io import sha256_of as tensor_sha256
from .accounting import adapter_nbytes, delta_memory
from .layers import (
                    BASE_ADAPTER,
                    CHUNK_ROWS,
                    DeltaLinear,
                    MixedAdapterError,
                    RoutedModule,
                    is_delta_codec,
                    row_groups,
)
from .loading import attach_delta, load_resident
from .model import (
                    ResidentState,
                    active_adapter,
                    delete_adapter,
                    disable_adapters,
                    forward,
                    generate,
                    list_adapters,
                    merge_adapter,
                    merge_and_unload,
                    resident_state,
                    set_adapter,
                    unload,
                    unmerge_adapter,
                    use_adapters,
)
from .routing import DeltaEmbedding, RawRouted

__all__ = [
                    "BASE_ADAPTER",
                    "CHUNK_ROWS",
                    "DeltaEmbedding",
                    "DeltaLinear",
                    "MixedAdapterError",
                    "RawRouted",
                    "ResidentState",
                    "RoutedModule",
                    "active_adapter",
                    "adapter_nbytes",
                    "attach_delta",
                    "delete_adapter",
                    "delta_memory",
                    "disable_adapters",
                    "forward",
                    "generate",
                    "is_delta_codec",
                    "list_adapters",
                    "load_resident",
                    "merge_adapter",
    "merge_and_unload",
                    "resident_state",
                    "row_groups",
                    "set_adapter",
                    "tensor_sha256",
                    "unload",
    "unmerge_adapter",
                    "unpack_pm1",
                    "use_adapters",
]
