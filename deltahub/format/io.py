"""Streaming safetensors I/O, model-checkpoint discovery, fingerprints and atomic directories.

deltahub reads tensors with plain positioned reads (not mmap), so resident memory holds only
the tensors in hand, and writes safetensors itself from a header planned up front, so a
model larger than RAM is written tensor by tensor.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import math
import mmap
import os
import re
import shutil
import socket
import stat
import struct
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

import numpy as np
import torch

from ..errors import CorruptFileError, DeltaHubError, MissingFileError, OutputExistsError, OutputWriteError, UnsafeOutputError, UnsafePathError
from .digest_cache import CheckpointDigests, digest_or_compute
from .names import check_name
from .spec import DTYPE_TO_STR, STR_TO_DTYPE

_HEADER_LIMIT = 100 * 1024 * 1024  # same sanity bound as the safetensors library
_MAX_DIM = 1 << 40  # no real dimension comes near; keeps products of dims in range


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json`` ``object_pairs_hook`` refusing duplicate keys (readers would disagree on which counts)."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(f"the key {k[:80]!r} appears twice")
        out[k] = v
    return out


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file, and what it is."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int
    path: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class SafetensorsFile:
    """One safetensors file: header parsed and validated on open, tensors read on demand."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise MissingFileError("safetensors file not found", path=self.path)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._readers = 0
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CorruptFileError(f"file is {size} bytes, too short for a safetensors header", path=self.path)
            (hlen,) = struct.unpack("<Q", head)
            if hlen > _HEADER_LIMIT or 8 + hlen > size:
                raise CorruptFileError(
                    f"header claims {hlen} bytes but the file has {size} bytes (truncated or not safetensors)",
                    path=self.path,
                )
            raw = f.read(hlen)
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise CorruptFileError(f"header is not valid JSON ({str(exc)[:200]})", path=self.path) from None
        except _DuplicateKey as exc:
            raise CorruptFileError(f"header is ambiguous: {exc}", path=self.path) from None
        if not isinstance(header, dict):
            raise CorruptFileError("header is not a JSON object", path=self.path)
        meta = header.pop("__metadata__", None)
        if meta is None:
            meta = {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise CorruptFileError("__metadata__ must map strings to strings", path=self.path)
        self.metadata: dict[str, str] = dict(meta)
        data_start = 8 + hlen
        data_size = size - data_start
        self.tensors: dict[str, TensorInfo] = {}
        for name, spec in header.items():
            self.tensors[name] = self._tensor_info(name, spec, data_start)
        # Like the safetensors library: byte ranges, in offset order, tile the data section exactly
        # (no overlap, no gap, nothing after the last tensor), so every byte has one meaning.
        pos = 0
        for info in sorted(self.tensors.values(), key=lambda i: (i.start, i.nbytes)):
            if info.start - data_start != pos:
                what = "overlaps the previous tensor" if info.start - data_start < pos else f"leaves a gap of {info.start - data_start - pos} bytes"
                raise CorruptFileError(f"tensor {info.name!r}: byte range starting at {info.start - data_start} {what}", path=self.path)
            pos += info.nbytes
        if pos != data_size:
            if pos > data_size:
                raise CorruptFileError(f"tensors end at byte {data_start + pos} but the file has {size} bytes (truncated)", path=self.path)
            raise CorruptFileError(f"{data_size - pos} bytes after the last tensor belong to no tensor", path=self.path)
        self._fh: Any = None

    def _tensor_info(self, name: str, spec: Any, data_start: int) -> TensorInfo:
        """One header entry, checked: known dtype, shape of non-negative ints, byte range of the right length."""
        if not isinstance(spec, dict) or not {"dtype", "shape", "data_offsets"} <= set(spec):
            raise CorruptFileError(f"tensor {name[:200]!r}: header entry must have dtype, shape and data_offsets", path=self.path)
        dtype = STR_TO_DTYPE.get(spec["dtype"]) if isinstance(spec["dtype"], str) else None
        if dtype is None:
            raise CorruptFileError(f"tensor {name[:200]!r}: unsupported dtype {str(spec['dtype'])[:40]!r}", path=self.path)
        shape, offsets = spec["shape"], spec["data_offsets"]
        if (not isinstance(shape, list) or len(shape) > 64
                or not all(type(s) is int and 0 <= s <= _MAX_DIM for s in shape)):
            raise CorruptFileError(f"tensor {name[:200]!r}: shape {str(shape)[:80]} is not a list of non-negative integers", path=self.path)
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(x) is int and x >= 0 for x in offsets):
            raise CorruptFileError(f"tensor {name[:200]!r}: data_offsets {str(offsets)[:80]} are not two non-negative integers", path=self.path)
        begin, end = offsets
        itemsize = dtype.itemsize
        if end - begin != math.prod(shape) * itemsize:
            raise CorruptFileError(f"tensor {name[:200]!r}: byte range {begin}..{end} does not fit shape {list(shape)} of {spec['dtype']}", path=self.path)
        return TensorInfo(name, dtype, tuple(shape), data_start + begin, end - begin, self.path)

    def keys(self) -> list[str]:
        """Tensor names in file order (by offset), which is the fastest order to read them."""
        return sorted(self.tensors, key=lambda n: self.tensors[n].start)

    def read_bytes(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor's raw little-endian bytes as a 1-D uint8 tensor (a copy, no mmap): a fresh one, or the
        first ``nbytes`` of ``out`` (a contiguous uint8 scratch the caller reuses, so no fresh pages per read).

        Threads read in parallel (``pread``: no shared file position, no lock)."""
        info = self.tensors[name]
        if out is None or out.dtype != torch.uint8 or not out.is_contiguous() or out.numel() < info.nbytes:
            buf = torch.empty(info.nbytes, dtype=torch.uint8)
        else:
            buf = out.view(-1)[:info.nbytes]
        if info.nbytes:
            got = self._read_into(memoryview(buf.numpy()), info.start)
            if got != info.nbytes:
                raise CorruptFileError(f"tensor {name!r}: read {got} of {info.nbytes} bytes (file truncated?)", path=self.path)
        return buf

    def read_span(self, name: str, offset: int, out: torch.Tensor) -> torch.Tensor:
        """Bytes ``[offset, offset + out.numel())`` of the tensor's data into ``out`` (a contiguous uint8 tensor),
        returned; only those bytes are read (a large tensor a chunk at a time)."""
        info = self.tensors[name]
        n = out.numel()
        if not 0 <= offset <= offset + n <= info.nbytes or out.dtype != torch.uint8 or not out.is_contiguous():
            raise ValueError(f"bytes {offset}..{offset + n} outside the {info.nbytes} of {name!r} (or not a uint8 buffer)")
        if n and self._read_into(memoryview(out.numpy()), info.start + offset) != n:
            raise CorruptFileError(f"tensor {name!r}: short read (file truncated?)", path=self.path)
        return out

    def read_rows(self, name: str, rows: Sequence[int]) -> torch.Tensor:
        """Rows ``rows`` (ascending, distinct) of the tensor's ``[rows, cols]`` view (all axes but the last folded
        into rows), as a ``[len(rows), cols]`` tensor of its dtype: only those bytes are read."""
        info = self.tensors[name]
        cols = info.shape[-1] if info.shape else 1
        nrows = info.nbytes // max(cols * info.dtype.itemsize, 1) if cols else 0
        row_bytes = cols * info.dtype.itemsize
        buf = torch.empty(len(rows) * row_bytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        gap = ROW_READ_GAP // max(row_bytes, 1)  # rows skipped within one read
        span_rows = max(ROW_READ_SPAN // max(row_bytes, 1), 1)
        i = 0
        while i < len(rows):  # rows close together in one read: consecutive ones, or a few skipped between them
            j = i + 1
            while j < len(rows) and 0 < rows[j] - rows[j - 1] <= gap + 1 and rows[j] - rows[i] < span_rows:
                j += 1
            if not 0 <= rows[i] <= rows[j - 1] < nrows:
                raise ValueError(f"rows {rows[i]}..{rows[j - 1]} outside the {nrows} rows of {name!r}")
            span = rows[j - 1] - rows[i] + 1
            direct = span == j - i  # consecutive: straight into the output
            out = view[i * row_bytes:j * row_bytes] if direct else memoryview(bytearray(span * row_bytes))
            if span * row_bytes and self._read_into(out, info.start + rows[i] * row_bytes) != span * row_bytes:
                raise CorruptFileError(f"tensor {name!r}: short read (file truncated?)", path=self.path)
            if not direct:
                pick = torch.tensor(rows[i:j], dtype=torch.long) - rows[i]
                torch.index_select(torch.frombuffer(out, dtype=torch.uint8).view(span, row_bytes), 0, pick,
                                   out=buf[i * row_bytes:j * row_bytes].view(j - i, row_bytes))
            i = j
        return buf.view(info.dtype).reshape(len(rows), cols) if buf.numel() else torch.empty(len(rows), cols, dtype=info.dtype)

    @contextlib.contextmanager
    def mapped(self, name: str) -> Iterator[MappedBytes | None]:
        """The tensor's bytes mapped from the file (no copy: the page cache's own pages), as :class:`MappedBytes`;
        None where files cannot be mapped or the tensor's bytes are not aligned to its element size (the caller reads
        instead). Unmapped on exit: views of it must not
        outlive the block."""
        info = self.tensors[name]
        if not info.nbytes or info.start % info.dtype.itemsize or not hasattr(mmap, "MADV_DONTNEED"):
            yield None
            return
        start = info.start - info.start % mmap.ALLOCATIONGRANULARITY
        try:
            with open(self.path, "rb") as fh:
                mm = mmap.mmap(fh.fileno(), info.start + info.nbytes - start, access=mmap.ACCESS_COPY, offset=start)
        except (OSError, ValueError, OverflowError):
            yield None
            return
        m = MappedBytes(mm, info.start - start, info.nbytes)
        try:
            yield m
        finally:
            m.close()

    def _read_into(self, view: memoryview, offset: int) -> int:
        """Fill ``view`` from ``offset``; the bytes read (fewer only at the end of the file)."""
        with self._lock:
            if self._fh is None:
                self._fh = open(self.path, "rb")
            fh = self._fh
            if not hasattr(os, "preadv"):  # no pread (Windows): one reader at a time
                fh.seek(offset)
                return fh.readinto(view) or 0
            self._readers += 1  # close() waits for them: the descriptor is never closed under a pread
        got = 0
        try:
            while got < len(view):
                n = os.preadv(fh.fileno(), [view[got:]], offset + got)
                if n <= 0:
                    break
                got += n
        finally:
            with self._lock:
                self._readers -= 1
                if not self._readers:
                    self._idle.notify_all()
        return got

    def read(self, name: str) -> torch.Tensor:
        """The tensor, with its dtype and shape."""
        info = self.tensors[name]
        return bytes_to_tensor(self.read_bytes(name), info.dtype, info.shape)

    def close(self) -> None:
        with self._lock:
            self._idle.wait_for(lambda: not self._readers)
            if self._fh is not None:
                self._fh.close()
                self._fh = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MappedBytes:
    """One tensor's bytes in a private read-only use mapping of its file (:meth:`SafetensorsFile.mapped`): :meth:`span`
    views them as a uint8 tensor, :meth:`done` drops the pages of a span already used from the process (they stay in
    the page cache), so a pass over a large tensor holds only the span in hand."""

    def __init__(self, mm: mmap.mmap, lead: int, nbytes: int) -> None:
        self._mm, self._lead, self.nbytes = mm, lead, nbytes
        self._arr = np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=lead)  # writable (copy-on-write): no warning

    def span(self, offset: int, n: int) -> torch.Tensor:
        """Bytes ``[offset, offset + n)`` of the tensor (a view of the mapping)."""
        if not 0 <= offset <= offset + n <= self.nbytes:
            raise ValueError(f"bytes {offset}..{offset + n} outside the tensor's {self.nbytes}")
        return torch.from_numpy(self._arr[offset:offset + n])

    def done(self, offset: int, n: int) -> None:
        """Bytes ``[offset, offset + n)`` will not be read again: unmap the whole pages inside them from this process."""
        a = self._lead + offset
        lo = -(-a // mmap.PAGESIZE) * mmap.PAGESIZE
        hi = (a + n) // mmap.PAGESIZE * mmap.PAGESIZE
        if hi > lo:
            self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> None:
        self._arr = None  # type: ignore[assignment]
        with contextlib.suppress(BufferError):  # a view still alive: unmapped when the last one goes
            self._mm.close()


def bytes_to_tensor(buf: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Reinterpret a uint8 buffer as a tensor of ``dtype`` and ``shape`` (no copy)."""
    if buf.numel() == 0:
        return torch.empty(shape, dtype=dtype)
    return buf.view(dtype).reshape(shape)


def tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as a flat uint8 view (contiguous copy only when needed)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def sha256_of(t: torch.Tensor) -> str:
    """Hex sha256 of a tensor's raw bytes (row-major, native little-endian): the manifest's ``base_sha256``."""
    return _bytes_sha256(tensor_bytes(t))


def _bytes_sha256(raw: torch.Tensor) -> str:
    """Hex sha256 of a flat uint8 tensor (a tensor's ``base_sha256`` from its bytes in memory)."""
    h = tensor_hasher()
    h.update(memoryview(raw.numpy()))
    return h.hexdigest()


def tensor_hasher() -> Any:
    """A fresh ``hashlib.sha256`` for one tensor's ``base_sha256`` (the one place a digest of a tensor's bytes
    starts: whole, by :func:`_bytes_sha256`, or a chunk at a time by a caller streaming the bytes)."""
    return hashlib.sha256()


# --------------------------------------------------------------------------------------------- write


def plan_header(specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None) -> tuple[bytes, int]:
    """Serialized safetensors header (8-byte length + JSON padded to 8) and payload size, for specs in order."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, dtype, shape in specs:
        n = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_TO_STR[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offset


def write_safetensors(
    path: str | Path,
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
    tensors: Iterable[torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write a safetensors file from specs planned up front and tensors produced one at a time.

    Each produced tensor must match its spec's dtype and shape; returns the bytes written.
    """
    head, total = plan_header(specs, metadata)
    path = Path(path)
    it = iter(tensors)
    with open(path, "wb") as f:
        f.write(head)
        for name, dtype, shape in specs:
            try:
                t = next(it)
            except StopIteration:
                raise CorruptFileError(f"writer ran out of tensors before {name!r}", path=path) from None
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise CorruptFileError(
                    f"tensor {name!r} is {t.dtype} {list(t.shape)}, planned as {dtype} {list(shape)}", path=path
                )
            b = tensor_bytes(t)
            if b.numel():
                f.write(memoryview(b.numpy()))
    return len(head) + total


def write_safetensors_parallel(
    path: str | Path,
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
    produce: Callable[[tuple[str, torch.dtype, tuple[int, ...]]], torch.Tensor],
    metadata: dict[str, str] | None = None,
    *,
    workers: int | None = None,
    on_written: Callable[[tuple[str, torch.dtype, tuple[int, ...]]], None] | None = None,
) -> int:
    """:func:`write_safetensors` with ``produce(spec)`` run on ``workers`` threads, each tensor written
    at its planned offset (``pwrite``) as soon as it is ready: decoding and writing overlap, no
    tensor waits for the one before it. A worker drops its tensor once written, so memory is bounded
    by the ``workers`` tensors being produced.

    The bytes are those :func:`write_safetensors` writes. The first failure in spec order is raised
    after every started worker has finished (none writes after this returns). ``on_written`` is
    called in the calling thread, in spec order. Returns the bytes written.
    """
    head, total = plan_header(specs, metadata)
    offsets = [len(head)]
    for s in specs:
        offsets.append(offsets[-1] + math.prod(s[2]) * s[1].itemsize)
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        _pwrite_all(fd, memoryview(head), 0)
        wlock = threading.Lock()

        def job(i: int) -> None:
            name, dtype, shape = specs[i]
            t = produce(specs[i])
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise CorruptFileError(f"tensor {name!r} is {t.dtype} {list(t.shape)}, planned as {dtype} {list(shape)}", path=path)
            b = tensor_bytes(t)
            if b.numel():
                with wlock:
                    _pwrite_all(fd, memoryview(b.numpy()), offsets[i])

        # A finished job has written its tensor and holds nothing: only running jobs (one per worker) hold
        # memory, so any number may finish ahead of the in-order progress reports (a large tensor at the
        # head no longer stalls the other workers once a window fills).
        with contextlib.closing(pipelined(range(len(specs)), job, workers=workers, ahead=len(specs))) as done:
            for i, _ in done:
                if on_written is not None:
                    on_written(specs[i])
        os.ftruncate(fd, len(head) + total)
    finally:
        os.close(fd)
    return len(head) + total


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (``pwrite`` may write less than asked)."""
    data = data.cast("B")
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def shard_is_full(filled_bytes: int, has_tensors: bool, nbytes: int, max_bytes: int) -> bool:
    """The one shard-cutting rule (model and delta shards): start a new shard when the current one
    holds something and ``nbytes`` more would take it over ``max_bytes`` (a single larger tensor
    gets a shard of its own)."""
    return has_tensors and filled_bytes + nbytes > max_bytes


def plan_shards(specs: list[tuple[str, torch.dtype, tuple[int, ...]]], max_bytes: int) -> list[list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    """Cut ``(name, dtype, shape)`` specs, in order, into shards by :func:`shard_is_full`."""
    shards: list[list[Any]] = [[]]
    size = 0
    for s in specs:
        n = math.prod(s[2]) * s[1].itemsize
        if shard_is_full(size, bool(shards[-1]), n, max_bytes):
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += n
    return shards


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """Write an in-memory dict of tensors as one safetensors file."""
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    return write_safetensors(path, specs, tensors.values(), metadata)


# --------------------------------------------------------------------------------------------- checkpoints


class Checkpoint:
    """A model's weights on disk: one ``.safetensors`` file, or a directory with one file or a sharded index.

    Gives a flat name -> :class:`TensorInfo` view and reads tensors one at a time.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            found = self.path.exists()
        except (OSError, ValueError) as exc:  # a name the OS refuses (too long, a NUL byte)
            raise MissingFileError(f"model path cannot be opened: {getattr(exc, 'strerror', None) or exc}", path=self.path) from None
        if not found:
            raise MissingFileError("model path not found", path=self.path)
        self.files: list[SafetensorsFile] = []
        if self.path.is_file():
            self.files = [SafetensorsFile(self.path)]
            self.dir = self.path.parent
        else:
            self.dir = self.path
            self.files = [SafetensorsFile(p) for p in self._weight_files(self.path)]
        self._index: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for name in f.keys():
                if name in self._index:
                    raise CorruptFileError(f"tensor {name!r} appears in two files ({self._index[name].path.name} and {f.path.name})", path=self.path)
                self._index[name] = f

    @staticmethod
    def _weight_files(d: Path) -> list[Path]:
        indexes = sorted(d.glob("*.safetensors.index.json"))
        if indexes:
            # Prefer the transformers-standard index name when several exist.
            preferred = [p for p in indexes if p.name == "model.safetensors.index.json"]
            index_path = (preferred or indexes)[0]
            try:
                index = json.loads(index_path.read_bytes().decode("utf-8"))
                weight_map = index["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                    raise TypeError("weight_map must map tensor names to file names")
                shard_names = sorted(set(weight_map.values()))
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise CorruptFileError(f"not a valid safetensors index ({str(exc)[:200]})", path=index_path) from None
            for n in shard_names:  # a base from the Hub is untrusted too: its index may not point out of the folder
                check_name(n, what=f"{index_path.name} weight_map", path=index_path)
                if not n.endswith(".safetensors"):
                    raise UnsafePathError(f"{index_path.name} weight_map names {n[:80]!r}, not a .safetensors file", path=index_path)
            paths = [d / n for n in shard_names]
            for p in paths:
                if not p.is_file():
                    raise MissingFileError(f"shard named by {index_path.name} is missing", path=p)
            return paths
        single = d / "model.safetensors"
        if single.is_file():
            return [single]
        found = sorted(p for p in d.glob("*.safetensors"))
        if not found:
            raise MissingFileError(
                "no safetensors weights (model.safetensors or a *.safetensors.index.json) in this directory; "
                "convert .bin checkpoints with transformers' save_pretrained(safe_serialization=True)",
                path=d,
            )
        return found

    def keys(self) -> list[str]:
        """Tensor names in storage order (file by file, by offset)."""
        return [n for f in self.files for n in f.keys()]

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def info(self, name: str) -> TensorInfo:
        return self._index[name].tensors[name]

    def read(self, name: str) -> torch.Tensor:
        return self._index[name].read(name)

    def read_bytes(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        return self._index[name].read_bytes(name, out)

    def read_rows(self, name: str, rows: Sequence[int]) -> torch.Tensor:
        return self._index[name].read_rows(name, rows)

    def read_span(self, name: str, offset: int, out: torch.Tensor) -> torch.Tensor:
        return self._index[name].read_span(name, offset, out)

    def mapped(self, name: str) -> contextlib.AbstractContextManager[MappedBytes | None]:
        return self._index[name].mapped(name)

    def config(self) -> dict[str, Any] | None:
        """The directory's ``config.json`` as a dict, or None when there is none."""
        p = self.dir / "config.json"
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise CorruptFileError(f"config.json is not valid JSON ({exc})", path=p) from None

    def total_bytes(self) -> int:
        return sum(self.info(n).nbytes for n in self._index)

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fingerprint(entries: dict[str, tuple[torch.dtype, tuple[int, ...], str]]) -> str:
    """Content fingerprint of a set of tensors from their per-tensor sha256 (format_spec.md, Fingerprint).

    ``sha256`` over, in byte order of the UTF-8 names, one line per tensor:
    ``name \\t DTYPE \\t shape-as-JSON \\t sha256-hex \\n``.
    """
    h = hashlib.sha256()
    for name in sorted(entries, key=lambda n: n.encode()):
        dtype, shape, digest = entries[name]
        h.update(f"{name}\t{DTYPE_TO_STR[dtype]}\t{json.dumps(list(shape), separators=(',', ':'))}\t{digest}\n".encode())
    return "sha256:" + h.hexdigest()


def checkpoint_fingerprint(ckpt: Checkpoint, digests: dict[str, str] | None = None) -> tuple[str, dict[str, str]]:
    """Fingerprint of a whole checkpoint, reading only tensors whose digest is not already known."""
    digests = dict(digests or {})
    entries = {}
    for name in ckpt.keys():
        info = ckpt.info(name)
        if name not in digests:
            digests[name] = _bytes_sha256(ckpt.read_bytes(name))
        entries[name] = (info.dtype, info.shape, digests[name])
    return fingerprint(entries), digests


# --------------------------------------------------------------------------------------------- outputs

#: ``errno`` values that can only come from writing: always an :class:`OutputWriteError`.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC)}
#: ``errno`` values that are an output failure when they name a path of the output.
_PATH_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.EEXIST, errno.ENOTEMPTY}
_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100
_renameat2_fn: Any = None


@functools.lru_cache(maxsize=1)
def _host_tag() -> str:
    """Where PIDs mean something, as it appears in temp names: the host name (no ``/`` or spaces)
    plus, on Linux, the PID namespace, so containers sharing a volume and a host name differ."""
    tag = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname() or "localhost")[:64] or "localhost"
    with contextlib.suppress(OSError):
        ns = re.sub(r"[^0-9]", "", os.readlink("/proc/self/ns/pid"))
        if ns:
            tag += f".ns{ns}"
    return tag


def _temp_path(target: Path, kind: str = "tmp") -> Path:
    """``.NAME.tmp-HOST-PID-RANDOM`` next to ``target`` (``kind`` ``old`` for a replaced output being deleted)."""
    return target.with_name(f".{target.name}.{kind}-{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _stale_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(name)}\.(?:tmp|old)-(?P<host>.+)-(?P<pid>[0-9]+)-[0-9a-f]{{8}}")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a real pid: keep, never guess
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM: alive, another user's
    return True


def remove_stale_temps(target: str | Path) -> list[Path]:
    """Delete temp entries an earlier, killed deltahub run left next to ``target``; return them.

    Only entries named exactly ``.NAME.tmp-HOST-PID-RANDOM`` / ``.NAME.old-HOST-PID-RANDOM`` for
    this ``NAME``, made on this host by a process that is no longer alive, owned by this user,
    and plain files or real directories (never symlinks) are removed.
    """
    target = Path(target)
    pattern, host = _stale_pattern(target.name), _host_tag()
    removed = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None or m["host"] != host or _pid_alive(int(m["pid"])):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if hasattr(os, "getuid") and st.st_uid != os.getuid():
            continue
        if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
            _remove(Path(entry.path))
            removed.append(Path(entry.path))
    return removed


def _remove(path: Path) -> None:
    """Delete a file, symlink or directory tree (never following a symlink); errors ignored."""
    try:
        st = os.lstat(path)
    except OSError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _identity(path: Path) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of ``path`` itself (not a symlink's target), None when absent."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _pin(path: Path) -> tuple[int | None, tuple[int, int] | None]:
    """Open ``path`` itself (not a symlink's target) and return ``(fd, identity)``.

    While the descriptor is open the inode cannot be freed, so a look-alike created after the
    original was deleted cannot reuse its number: ``(st_dev, st_ino)`` then identifies it.
    """
    flags = getattr(os, "O_PATH", os.O_RDONLY) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None, None
    except OSError:
        return None, _identity(path)  # cannot open it (e.g. a symlink without O_PATH): best effort
    st = os.fstat(fd)
    return fd, (st.st_dev, st.st_ino)


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False when the kernel, libc or filesystem lacks it (then use a fallback)."""
    global _renameat2_fn
    if _renameat2_fn is None:
        fn: Any = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fn = getattr(libc, "renameat2", False)
                if fn:
                    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                    fn.restype = ctypes.c_int
            except (OSError, AttributeError):
                fn = False
        _renameat2_fn = fn
    if not _renameat2_fn:
        return False
    if _renameat2_fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False  # not supported here (old kernel, or a filesystem without the flag)
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; :class:`FileExistsError` if ``dst`` exists, which is never replaced.

    ``renameat2(RENAME_NOREPLACE)`` where available (Linux); else a hard link for files
    (``link`` fails atomically on an existing name), and for directories a check then
    ``rename``, which fails on an existing non-empty directory or file: only an *empty*
    directory created in the instant between check and rename could be replaced.
    """
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    if not os.path.isdir(src) or os.path.islink(src):
        try:
            os.link(src, dst, follow_symlinks=False)
        except FileExistsError:
            raise
        except OSError:
            pass  # no hard links on this filesystem: the check above is all we have
        else:
            os.unlink(src)
            return
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        raise


def _real(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(os.fspath(path)))


def _within(inner: Path, outer: Path) -> bool:
    """``inner`` is ``outer`` or lies inside it (both real paths)."""
    return inner == outer or outer in inner.parents


def _input_paths(path: Path) -> list[Path]:
    """The real paths an input occupies: itself, the real targets of its top-level symlinks (Hub
    snapshots point into ``blobs/``), and a Hub snapshot's whole repo folder."""
    real = _real(path)
    out = [real]
    if real.parent.name == "snapshots" and real.parent.parent.name.count("--") >= 1:
        out.append(real.parent.parent)  # models--ns--name: snapshots, blobs, refs
    if path.is_dir():
        with contextlib.suppress(OSError):
            for entry in os.scandir(path):
                if entry.is_symlink() and entry.is_file():  # a weight file kept elsewhere (Hub blobs)
                    out.append(_real(entry.path))
    return out


def check_output(target: str | Path, *, inputs: Mapping[str, str | os.PathLike[str] | None] | None = None,
                 protect: Iterable[str | os.PathLike[str] | None] = (), overwrite: bool = False) -> Path:
    """Refuse an output that would destroy an input or the workspace; return its absolute path.

    Checked for every output deltahub writes (``compress``, ``apply``, ``pull``, ``calibrate``),
    before any work and again by :func:`atomic_directory` / :func:`atomic_file`:

    * :class:`UnsafeOutputError` when the output (real path, symlinks resolved) *is*, *contains*
      or *lies inside* one of ``inputs`` (role -> path; missing paths, e.g. Hub ids, are skipped;
      a Hub snapshot also covers its repo cache folder and the blobs its symlinks point to);
      and when it is or contains the filesystem root, the home directory, the current
      directory or one of ``protect`` (e.g. the Hub cache), with or without ``overwrite``.
    * :class:`OutputExistsError` when it exists and ``overwrite`` is false.
    """
    given = Path(target)
    path = Path(os.path.abspath(os.fspath(target)))
    real = _real(path)
    if not path.name or real == Path(real.anchor):
        raise UnsafeOutputError("output is the filesystem root; choose a new directory", path=given)
    try:
        home: str | Path | None = Path.home()
    except (RuntimeError, KeyError):
        home = None
    protected = [("the current directory", os.getcwd()), ("your home directory", home), *(("a cache deltahub reads", q) for q in protect)]
    for what, p in protected:
        if p is None:
            continue
        rp = _real(p)
        if _within(rp, real):
            rel = "is" if rp == real else "contains"
            raise UnsafeOutputError(f"output {rel} {what} ({rp}); choose a new directory", path=given)
    for role, p in (inputs or {}).items():
        if p is None or isinstance(p, Mapping) or not os.path.lexists(os.fspath(p)):
            continue
        for rp in _input_paths(Path(p)):
            if _within(rp, real):
                rel = "is" if rp == real else "contains"
            elif _within(real, rp):
                rel = "is inside"
            else:
                continue
            raise UnsafeOutputError(f"output {rel} the {role} ({p}); writing there would destroy it", path=given)
    if os.path.lexists(path) and not overwrite:
        raise OutputExistsError("output already exists (pass overwrite=True / --overwrite to replace it)", path=given)
    return path


def output_write_error(exc: OSError, target: str | Path, *, tmp: Path | None = None) -> OutputWriteError | None:
    """The :class:`OutputWriteError` an OS failure while writing ``target`` becomes, or None when
    it is not about the output (e.g. reading an input failed)."""
    where = exc.filename
    ours = False
    if where is not None:
        w = os.path.abspath(os.fspath(where))
        out = os.path.abspath(os.fspath(target))
        parent, name = os.path.split(out)
        roots = [out] + ([os.path.abspath(tmp)] if tmp is not None else [])
        ours = (any(w == r or w.startswith(r + os.sep) for r in roots) or out.startswith(w + os.sep)
                or (os.path.dirname(w) == parent and os.path.basename(w).startswith(f".{name}.")))
    if exc.errno not in _WRITE_ERRNOS and not (ours and exc.errno in _PATH_ERRNOS):
        return None
    code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    detail = f" (writing {Path(os.fspath(where)).name})" if ours and where is not None and tmp is not None else ""
    err = OutputWriteError(f"cannot write the output: {exc.strerror or os.strerror(exc.errno or 0)} [{code}]{detail}; nothing was written", path=target)
    err.errno = exc.errno  # (not strerror: OSError.__str__ would then drop the message)
    return err


_CONCURRENT = "while this run was writing it (another deltahub run, or a program, writing the same output?)"


def _commit(tmp: Path, target: Path, *, overwrite: bool, replaces: tuple[int, int] | None) -> None:
    """Move the finished ``tmp`` to ``target`` without ever replacing what this run did not mean to.

    ``replaces`` is the identity of the output the caller asked to overwrite, seen when it started.
    """
    kept = "; it was left untouched and this run's result discarded"
    current = _identity(target)
    if current is None:
        try:
            _rename_noreplace(tmp, target)
        except FileExistsError:
            raise OutputExistsError(f"output appeared {_CONCURRENT}{kept}", path=target) from None
        return
    if not overwrite or replaces is None or current != replaces:
        what = "appeared" if replaces is None else "was replaced"
        raise OutputExistsError(f"output {what} {_CONCURRENT}{kept}", path=target)
    if _renameat2(tmp, target, _RENAME_EXCHANGE):
        # tmp now holds the old output: delete it only if it is the one asked to be replaced.
        if _identity(tmp) != replaces:
            _renameat2(tmp, target, _RENAME_EXCHANGE)  # swap back: the newcomer is not ours to delete
            raise OutputExistsError(f"output was replaced {_CONCURRENT}{kept}", path=target)
        _remove(tmp)
        return
    trash = _temp_path(target, "old")
    _rename_noreplace(target, trash)
    if _identity(trash) != replaces:  # swapped by someone between the check and the move: put it back
        try:
            _rename_noreplace(trash, target)
        except FileExistsError:
            raise OutputExistsError(f"output was replaced {_CONCURRENT}; that output is now {trash}", path=target) from None
        raise OutputExistsError(f"output was replaced {_CONCURRENT}{kept}", path=target)
    try:
        _rename_noreplace(tmp, target)
    except FileExistsError:
        # another run wrote the output after ours moved the old one aside: the old one (identity checked) is
        # the output the user asked to replace, so it is removed as asked; the newcomer is not touched
        _remove(trash)
        raise OutputExistsError(f"output appeared {_CONCURRENT}; this run's result was discarded (the output it was "
                                "asked to replace is gone, as asked)", path=target) from None
    except BaseException:  # interrupted or failed: the old output goes back where it was
        with contextlib.suppress(OSError):
            _rename_noreplace(trash, target)
        raise
    _remove(trash)


@contextlib.contextmanager
def _atomic(target: str | Path, *, overwrite: bool, inputs: Mapping[str, Any] | None, protect: Iterable[Any],
            make: Callable[[Path], None]) -> Iterator[Path]:
    given = Path(target)
    path = check_output(target, inputs=inputs, protect=protect, overwrite=overwrite)
    pin_fd, replaces = _pin(path) if overwrite else (None, None)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        tmp = _temp_path(path)
        make(tmp)
        yield tmp
        _commit(tmp, path, overwrite=overwrite, replaces=replaces)
        tmp = None
    except OSError as exc:
        err = None if isinstance(exc, DeltaHubError) else output_write_error(exc, given, tmp=tmp)
        if err is None:
            raise
        raise err from None
    finally:
        if tmp is not None:
            _remove(tmp)
        if pin_fd is not None:
            os.close(pin_fd)


@contextlib.contextmanager
def atomic_directory(target: str | Path, *, overwrite: bool = False, inputs: Mapping[str, Any] | None = None,
                     protect: Iterable[Any] = ()) -> Iterator[Path]:
    """Yield a temporary sibling directory to fill; on success move it to ``target``, on error delete it.

    Every output deltahub writes goes through here (or :func:`atomic_file`). Guarantees:

    * Checked first (:func:`check_output`): an output that is, contains or lies inside an input
      (``inputs``: role -> path), or that is ``/``, the home or current directory or one of
      ``protect``, is refused with :class:`UnsafeOutputError`, ``overwrite`` or not.
    * The temp is ``.NAME.tmp-HOST-PID-RANDOM`` next to ``target``; it is deleted on any error,
      ``KeyboardInterrupt`` (the CLI turns SIGTERM into one) included. Temps of runs that died
      (SIGKILL, power loss) are removed by the next run writing the same ``target``: only exact
      name matches, from this host, whose PID is no longer alive.
    * The final move never replaces anything this run did not ask to: without ``overwrite`` it is
      an atomic no-replace rename (``renameat2(RENAME_NOREPLACE)``; elsewhere a hard link for
      files, or check-then-rename for directories), so an output that appeared meanwhile (a second
      run, a user's folder) is kept and this run fails with :class:`OutputExistsError`. With
      ``overwrite`` only the very output seen at the start is replaced (same device and inode,
      held open meanwhile so the number cannot be reused by a look-alike):
      atomically swapped with ``RENAME_EXCHANGE`` (else moved aside to ``.NAME.old-...``) and then
      deleted; if another run replaced it meanwhile, that one is kept (swapped back if needed) and
      this run fails. Of two concurrent runs on one output, exactly one wins; none is lost silently.
    * OS failures while writing (disk full, read-only, file too large, permission denied) become
      :class:`OutputWriteError` naming the output and the errno; the temp is removed.
    """
    with _atomic(target, overwrite=overwrite, inputs=inputs, protect=protect, make=lambda p: p.mkdir()) as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_file(path: str | Path, *, overwrite: bool = True, inputs: Mapping[str, Any] | None = None,
                protect: Iterable[Any] = ()) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success move it to ``path``, else delete it.

    Same checks and guarantees as :func:`atomic_directory` (``overwrite`` defaults to True here,
    for the JSON files deltahub writes inside its own temp directories).
    """
    with _atomic(path, overwrite=overwrite, inputs=inputs, protect=protect, make=lambda p: None) as tmp:
        yield tmp


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to ``path`` via a temporary file and rename."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def prefetch(items: Iterable[T], fn: Callable[[T], R]) -> Iterator[tuple[T, R]]:
    """Yield ``(item, fn(item))`` in order while ``fn`` of the next item runs in a background thread.

    Used to overlap reading + hashing the next tensor (both release the GIL) with coding the
    current one; memory holds at most two items' results.
    """
    it = iter(items)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="deltahub-prefetch") as pool:
        try:
            cur = next(it)
        except StopIteration:
            return
        fut = pool.submit(fn, cur)
        for nxt in it:
            result = fut.result()
            fut = pool.submit(fn, nxt)
            yield cur, result
            cur = nxt
        yield cur, fut.result()


def read_with_digest(ckpt: Checkpoint, name: str, cache: CheckpointDigests | None = None,
                     out: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
    """A tensor from a checkpoint and the sha256 of its bytes, in one read (the hash skipped when
    ``cache`` knows it: :mod:`.digest_cache`); ``out``: a scratch buffer to read into (see
    :meth:`SafetensorsFile.read_bytes`)."""
    raw = ckpt.read_bytes(name, out)
    info = ckpt.info(name)
    return bytes_to_tensor(raw, info.dtype, info.shape), digest_or_compute(cache, name, lambda: _bytes_sha256(raw))


def base_digest(ckpt: Checkpoint, name: str, cache: CheckpointDigests | None = None) -> str:
    """The sha256 of a checkpoint tensor's bytes: from ``cache`` without reading anything, else read and hashed."""
    return digest_or_compute(cache, name, lambda: _bytes_sha256(ckpt.read_bytes(name)))


def default_workers() -> int:
    """Worker threads for the rebuild pipeline: the CPUs this process may run on, at most 8 (memory
    bandwidth, not cores, limits it beyond); ``DELTAHUB_NUM_WORKERS`` overrides."""
    env = os.environ.get("DELTAHUB_NUM_WORKERS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def _one_torch_thread() -> None:
    """Pipeline workers run torch ops single-threaded (a per-thread OpenMP setting): the parallelism is
    across tensors, and 2 workers x N intra-op threads would oversubscribe the cores."""
    torch.set_num_threads(1)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """The calling thread's torch ops single-threaded for the block (restored after): a thread that coordinates
    pipeline workers would otherwise start torch's intra-op threads for its own small ops (a tie check, a
    comparison with the base), which then compete with the workers for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


#: :meth:`SafetensorsFile.read_rows` reads rows at most this many bytes apart in one call (the bytes between them
#: read and dropped: a read call costs about as much as copying this from the page cache), up to
#: ``ROW_READ_SPAN`` bytes per call. The measure pass samples every few rows of small matrices: one read each
#: instead of one per row.
ROW_READ_GAP = 32 * 1024
ROW_READ_SPAN = 4 * 2**20
#: Items in flight per worker when their bytes bound the window (:func:`pipelined`): measured on the real
#: pair's default delta, apply took 1.70 s best-of-3 with 1 (head-of-line blocking behind the 113 MB
#: embedding), 1.42 s with 4 and 1.40 s with 16 (benchmarks/throughput.md).
AHEAD = 8


def pipelined(items: Iterable[T], fn: Callable[[T], R], *, workers: int | None = None,
              cost: Callable[[T], int] | None = None, max_cost: int = 0, ahead: int | None = None) -> Iterator[tuple[T, R]]:
    """Yield ``(item, fn(item))`` in order while ``fn`` runs on ``workers`` threads ahead of the consumer.

    Read, hash, decode (all GIL-free in torch / hashlib / zstd) then overlap each other and the
    consumer's writes. Without ``cost`` at most ``workers + 1`` items are in flight. With it, their
    summed ``cost`` (bytes) stays within ``max_cost`` (one item is always allowed) and up to
    ``AHEAD * workers`` items may be in flight: a large tensor at the head of the queue then no longer
    idles the other workers (small ones run past it), while memory stays bounded by the bytes.
    ``ahead`` overrides that count (for ``fn`` whose results hold no memory, e.g. a job that writes its
    tensor and returns None: any number may then finish ahead of the consumer).
    An exception in ``fn`` surfaces when its item's turn comes.
    """
    todo = list(items)
    workers = workers or default_workers()
    limit = ahead if ahead is not None else workers if cost is None else AHEAD * workers
    cost = cost or (lambda _: 0)
    pending: collections.deque[tuple[T, int, Future[R]]] = collections.deque()
    inflight, i = 0, 0
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deltahub-pipeline", initializer=_one_torch_thread) as pool:
        try:
            while i < len(todo) or pending:
                while i < len(todo) and (not pending or (len(pending) <= limit and inflight + cost(todo[i]) <= max_cost)):
                    c = cost(todo[i])
                    pending.append((todo[i], c, pool.submit(fn, todo[i])))
                    inflight, i = inflight + c, i + 1
                item, c, fut = pending.popleft()
                result = fut.result()
                inflight -= c
                yield item, result
                del result
        finally:
            for *_, fut in pending:
                fut.cancel()
