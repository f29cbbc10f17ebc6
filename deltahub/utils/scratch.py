"""Per-thread reusable buffers for the streaming passes (compress, apply).

A fresh multi-megabyte tensor costs a page fault per 4 KiB page the first time it is written (the
kernel zero-fills each page), and large allocations are returned to the kernel when freed, so every
tensor of a pass paid that again: ~1.5 million faults, a fifth of compress's CPU time on a 250M-parameter
pair. A worker thread that reads, subtracts or decodes into the same named buffer for each of its tensors
touches those pages once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading

import torch


class ThreadScratch:
    """Named uint8 buffers, one set per thread, grown on demand and reused; buffers above ``cap`` bytes are
    not kept (:meth:`get` returns None: the caller allocates as before).

    A buffer stays valid until the same thread asks for the same name again: results that outlive the
    caller's step must not be views of it (:meth:`owns` tells).
    """

    def __init__(self, cap: int, pool: BufferPool | None = None) -> None:
        self.cap = cap
        self._local = threading.local()
        self._pool = pool

    def get(self, name: str, nbytes: int) -> torch.Tensor | None:
        """This thread's buffer ``name`` of at least ``nbytes`` bytes (flat uint8), or None above the cap. With a
        ``pool``, new buffers come from it (pages an earlier pass touched)."""
        if nbytes > self.cap:
            return None
        bufs = self._bufs()
        buf = bufs.get(name)
        if buf is None or buf.numel() < nbytes:
            if self._pool is not None:  # (an outgrown buffer is dropped, not kept in the pool)
                buf = bufs[name] = self._pool.acquire(max(nbytes, 1))
            else:
                buf = bufs[name] = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        return buf

    def owns(self, t: torch.Tensor) -> bool:
        """Whether ``t``'s memory lies in one of this thread's buffers."""
        if t.device.type != "cpu" or t.numel() == 0:
            return False
        lo = t.untyped_storage().data_ptr()
        hi = lo + t.untyped_storage().nbytes()
        for buf in self._bufs().values():
            b0 = buf.data_ptr()
            if lo < b0 + buf.numel() and b0 < hi:
                return True
        return False

    def _bufs(self) -> dict[str, torch.Tensor]:
        bufs = getattr(self._local, "bufs", None)
        if bufs is None:
            bufs = self._local.bufs = {}
        return bufs


class BufferPool:
    """Reusable uint8 buffers handed between threads: :meth:`acquire` one (the smallest free one that fits,
    else a new one), :meth:`release` it when no tensor viewing it is used any more. At most ``keep`` free
    buffers are kept (the smallest are dropped first); requests above ``cap`` bytes get a buffer that is not kept."""

    def __init__(self, cap: int, keep: int = 8) -> None:
        self.cap, self.keep = cap, keep
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def acquire(self, nbytes: int) -> torch.Tensor:
        if nbytes <= self.cap:
            with self._lock:
                fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
                if fits:  # (by index: == on tensors compares elements)
                    return self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        return torch.empty(max(nbytes, 1), dtype=torch.uint8)

    def trim(self, keep: int) -> None:
        """Keep at most ``keep`` free buffers from now on (the largest), dropping the others."""
        with self._lock:
            self.keep = keep
            self._free.sort(key=lambda b: b.numel(), reverse=True)
            del self._free[keep:]

    def release(self, buf: torch.Tensor | None) -> None:
        if buf is None or buf.numel() > self.cap:
            return
        with self._lock:
            self._free.append(buf)
            if len(self._free) > self.keep:
                self._free.pop(min(range(len(self._free)), key=lambda i: self._free[i].numel()))


_LIBC: list[object] = []


def release_free_heap() -> None:
    """Hand the allocator's free heap pages back to the kernel (glibc's ``malloc_trim``; nothing elsewhere).

    Many small buffers freed by one pass stay in the allocator's arenas, counted in the process's RSS; compress
    calls this between its passes so the next pass's large buffers are not stacked on them.
    """
    if not sys.platform.startswith("linux"):
        return
    if not _LIBC:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.append(getattr(libc, "malloc_trim", None))
        except OSError:
            _LIBC.append(None)
    trim = _LIBC[0]
    if trim is not None:
        trim(0)  # type: ignore[operator]
