"""Streaming safetensors I/O, model-checkpoint discovery, fingerprints and atomic directories.

deltahub reads tensors with plain positioned reads (not mmap), so resident memory holds only
the tensors in hand, and writes safetensors itself from a header planned up front, so a
model larger than RAM is written tensor by tensor.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import struct
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

import torch

from ..errors import CorruptFileError, MissingFileError, OutputExistsError
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
        itemsize = torch.empty((), dtype=dtype).element_size()
        if end - begin != math.prod(shape) * itemsize:
            raise CorruptFileError(f"tensor {name[:200]!r}: byte range {begin}..{end} does not fit shape {list(shape)} of {spec['dtype']}", path=self.path)
        return TensorInfo(name, dtype, tuple(shape), data_start + begin, end - begin, self.path)

    def keys(self) -> list[str]:
        """Tensor names in file order (by offset), which is the fastest order to read them."""
        return sorted(self.tensors, key=lambda n: self.tensors[n].start)

    def read_bytes(self, name: str) -> torch.Tensor:
        """The tensor's raw little-endian bytes as a 1-D uint8 tensor (a fresh copy, no mmap)."""
        info = self.tensors[name]
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            with self._lock:
                if self._fh is None:
                    self._fh = open(self.path, "rb")
                self._fh.seek(info.start)
                got = self._fh.readinto(memoryview(buf.numpy()))
            if got != info.nbytes:
                raise CorruptFileError(f"tensor {name!r}: read {got} of {info.nbytes} bytes (file truncated?)", path=self.path)
        return buf

    def read(self, name: str) -> torch.Tensor:
        """The tensor, with its dtype and shape."""
        info = self.tensors[name]
        return bytes_to_tensor(self.read_bytes(name), info.dtype, info.shape)

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
    """Hex sha256 of a tensor's raw bytes."""
    b = tensor_bytes(t)
    return hashlib.sha256(memoryview(b.numpy())).hexdigest()


# --------------------------------------------------------------------------------------------- write


def plan_header(specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None) -> tuple[bytes, int]:
    """Serialized safetensors header (8-byte length + JSON padded to 8) and payload size, for specs in order."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, dtype, shape in specs:
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
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
        if not self.path.exists():
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
                index = json.loads(index_path.read_text())
                shard_names = sorted(set(index["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise CorruptFileError(f"not a valid safetensors index ({exc!r})", path=index_path) from None
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

    def read_bytes(self, name: str) -> torch.Tensor:
        return self._index[name].read_bytes(name)

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
            digests[name] = hashlib.sha256(memoryview(ckpt.read_bytes(name).numpy())).hexdigest()
        entries[name] = (info.dtype, info.shape, digests[name])
    return fingerprint(entries), digests


# --------------------------------------------------------------------------------------------- atomic dirs


@contextlib.contextmanager
def atomic_directory(target: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success rename it to ``target``, on error delete it.

    An interrupted run never leaves a half-written ``target``. With ``overwrite`` an existing
    ``target`` is replaced only after the new one is complete.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise OutputExistsError("output already exists (pass overwrite=True / --overwrite to replace it)", path=target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    trash = None
    if target.exists():
        trash = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, trash)
    os.replace(tmp, target)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True) if trash.is_dir() else trash.unlink()


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success rename it to ``path``, else delete it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


def read_with_digest(ckpt: Checkpoint, name: str) -> tuple[torch.Tensor, str]:
    """A tensor from a checkpoint and the sha256 of its bytes, in one read."""
    raw = ckpt.read_bytes(name)
    info = ckpt.info(name)
    return bytes_to_tensor(raw, info.dtype, info.shape), hashlib.sha256(memoryview(raw.numpy())).hexdigest()
