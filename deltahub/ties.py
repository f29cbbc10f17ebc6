"""Tied tensors: one fine-tune tensor stored under several names with identical bytes (format 1.3 ``alias``).

Older and non-``transformers`` checkpoints (and some sharded models) store a tied embedding and LM head
twice, byte for byte. ``compress`` codes such a tensor once, under its first name, and writes an alias
entry for each later name (format_spec.md 4.11), when the base tensors of the names are identical too:
otherwise the two deltas differ and each is coded on its own.

Finding them costs little: only tensors that share their dtype and shape with another tensor of the
fine-tune are looked at; each gets a key (its base tensor's digest, dtype and shape, and a hash of a
strided sample of at most ~64 KiB of its own bytes, O(1) per tensor), and only a key seen before costs a
full comparison, one re-read of the earlier tensor (so a tied pair costs one extra read of the tensor).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from .codecs.unchanged import same_bits
from .format.io import Checkpoint, tensor_bytes

#: Bytes of a tensor hashed for its key (evenly strided), so a key costs O(1) whatever the tensor's size.
SAMPLE_BYTES = 1 << 16
#: Earlier tensors kept per key: a key shared by tensors that differ (a sample collision) costs at most
#: this many full comparisons.
MAX_CANDIDATES = 4


def _sample_bytes(t: torch.Tensor) -> bytes:
    """An evenly strided sample of ``t``'s bytes (at most ~:data:`SAMPLE_BYTES` of them)."""
    raw = tensor_bytes(t).numpy()
    step = sample_step(raw.size)
    # numpy's strided copy: one thread (a torch copy of this size would start torch's intra-op threads from the
    # calling thread, which costs more than the copy while compress's workers hold the cores)
    return raw[::step].tobytes()


def sample_step(nbytes: int) -> int:
    """The byte stride of a tensor's tie sample (a caller sampling its bytes a chunk at a time takes every byte
    whose offset is a multiple of it)."""
    return max(1, nbytes // SAMPLE_BYTES)


class TieFinder:
    """Decides, tensor by tensor in storage order, which names are aliases of an earlier one.

    ``same_coding(a, b)`` says whether the writer's policy would code names ``a`` and ``b`` alike (a
    user rule giving them different codecs keeps both coded). Decisions are remembered, so a second pass
    over the tensors (compress's allocation, then its encoding) gets the same answers without any work.
    """

    def __init__(self, ft: Checkpoint, same_coding: Callable[[str, str], bool] | None = None,
                 base: Checkpoint | None = None) -> None:
        self._ft, self._base = ft, base
        self._same_coding = same_coding or (lambda a, b: True)
        counts = Counter((ft.info(n).dtype, tuple(ft.info(n).shape)) for n in ft.keys())
        self._shared = {k for k, c in counts.items() if c > 1}
        self._firsts: dict[tuple[Any, ...], list[str]] = {}
        self._decided: dict[str, str | None] = {}

    def is_decided(self, name: str) -> bool:
        """Whether ``name`` was decided already (:meth:`decide` / :meth:`target` are then lookups, safe from any
        thread and in any order)."""
        return name in self._decided

    @property
    def aliases(self) -> dict[str, str]:
        """Alias name -> target name, of the names decided so far."""
        return {n: t for n, t in self._decided.items() if t is not None}

    def target(self, name: str, ft_t: torch.Tensor, base_t: torch.Tensor | None, base_digest: str | None) -> str | None:
        """The earlier name ``name`` is an alias of (same fine-tune bytes, dtype and shape; base tensors of the
        same digest, dtype and shape, or both absent), or None. A tensor equal to its base (``unchanged``, 0
        bytes) is never an alias: nothing would be saved."""
        if name in self._decided:
            return self._decided[name]
        return self.decide(name, self.key(ft_t, base_t, base_digest), ft_t, base_t)

    def key(self, ft_t: torch.Tensor, base_t: torch.Tensor | None, base_digest: str | None,
            sample: bytes | None = None) -> tuple[Any, ...] | None:
        """The tensor's key (None when no other tensor shares its dtype and shape): O(1), safe from any thread,
        so workers can compute it while the tensor is in memory and :meth:`decide` runs later, in order.
        ``sample``: the bytes to hash instead of a strided sample of ``ft_t`` (a caller that hashes the same
        part of every tensor of a shape)."""
        if ft_t.numel() == 0:
            return None
        base = None if base_t is None else (base_t.dtype, tuple(base_t.shape))
        return self.key_of(ft_t.dtype, tuple(ft_t.shape), base, base_digest,
                           sample if sample is not None else _sample_bytes(ft_t))

    def key_of(self, dtype: torch.dtype, shape: tuple[int, ...], base: tuple[torch.dtype, tuple[int, ...]] | None,
               base_digest: str | None, sample: bytes) -> tuple[Any, ...] | None:
        """:meth:`key` from a tensor's dtype and shape, its base's ``(dtype, shape)`` (None without one), and the
        bytes sampled from it (a caller that read only part of the tensor)."""
        if (dtype, shape) not in self._shared:
            return None
        base_key = None if base is None else (*base, base_digest)
        return (dtype, shape, base_key, hashlib.sha256(sample).digest())

    def decide(self, name: str, key: tuple[Any, ...] | None, ft_t: torch.Tensor | None = None,
               base_t: torch.Tensor | None = None) -> str | None:
        """:meth:`target` from the tensor's :meth:`key`, called in storage order. Only a key seen before costs
        work: the full comparison, with ``ft_t`` / ``base_t`` or, without them, the tensors read again."""
        if name in self._decided:
            return self._decided[name]
        found = None
        if key is not None:
            firsts = self._firsts.setdefault(key, [])
            for cand in firsts:
                if not self._same_coding(cand, name):
                    continue
                ft = ft_t if ft_t is not None else self._ft.read(name)
                if same_bits(self._ft.read(cand), ft):
                    if key[2] is not None:  # equal to its base (unchanged, 0 bytes): not an alias
                        base = base_t if base_t is not None else self._base_read(name)
                        if base is not None and same_bits(base, ft):
                            break
                    found = cand
                    break
            else:
                if len(firsts) < MAX_CANDIDATES:
                    firsts.append(name)
        self._decided[name] = found
        return found

    def _base_read(self, name: str) -> torch.Tensor | None:
        return self._base.read(name) if self._base is not None and name in self._base else None
