"""The delta's tensor files: ``delta.safetensors`` or ``delta-0000N-of-0000M.safetensors`` + index."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import torch

from ..errors import CorruptFileError, ManifestError, MissingFileError, UnsafePathError
from .digest_cache import CheckpointDigests
from .integrity import check_file_bytes, check_tensor, tensor_digest
from .io import SafetensorsFile, TensorInfo, bytes_to_tensor, save_tensors, shard_is_full, tensor_bytes, write_json_atomic
from .manifest import Manifest
from .names import is_delta_weights_name, member
from .spec import (
    DEFAULT_MAX_SHARD_BYTES,
    FORMAT_NAME,
    FORMAT_VERSION,
    SHARD_PATTERN,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)


class DeltaShardWriter:
    """Buffers stored tensors and cuts a new shard when ``max_shard_bytes`` would be exceeded.

    Shards are written as they fill (memory holds at most one shard) under temporary names,
    then renamed by :meth:`finish` once their count is known.
    """

    def __init__(self, directory: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._codecs: Counter[str] = Counter()
        self._buffered = 0
        self._written: list[tuple[Path, list[str], int]] = []

    def add(self, tensors: dict[str, torch.Tensor], codec: str) -> dict[str, str]:
        """Queue the stored tensors of one model tensor (kept together in one shard).

        Returns each stored tensor's digest (:func:`.integrity.tensor_digest` of the bytes written).
        """
        digests = {k: tensor_digest(t.dtype, t.shape, memoryview(tensor_bytes(t).numpy())) for k, t in tensors.items()}
        n = sum(t.numel() * t.element_size() for t in tensors.values())
        if shard_is_full(self._buffered, bool(self._buffer), n, self.max_shard_bytes):
            self._flush()
        self._buffer.update(tensors)
        self._buffered += n
        if tensors:
            self._codecs[codec] += 1
        return digests

    def _flush(self) -> None:
        path = self.directory / f".shard-{len(self._written):05d}.tmp"
        meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "codecs": json.dumps(dict(sorted(self._codecs.items())))}
        save_tensors(path, self._buffer, meta)
        self._written.append((path, list(self._buffer), self._buffered))
        self._buffer, self._buffered, self._codecs = {}, 0, Counter()

    def finish(self) -> list[str]:
        """Write the last shard, give shards their final names, write the index when sharded."""
        if self._buffer or not self._written:
            self._flush()
        total = len(self._written)
        if total == 1:
            os.replace(self._written[0][0], self.directory / WEIGHTS_NAME)
            return [WEIGHTS_NAME]
        weight_map: dict[str, str] = {}
        names = []
        for i, (path, keys, _) in enumerate(self._written, start=1):
            final = SHARD_PATTERN.format(index=i, total=total)
            os.replace(path, self.directory / final)
            weight_map.update(dict.fromkeys(keys, final))
            names.append(final)
        index = {
            "metadata": {"total_size": sum(n for *_, n in self._written), "format": FORMAT_NAME, "format_version": FORMAT_VERSION},
            "weight_map": weight_map,
        }
        write_json_atomic(self.directory / WEIGHTS_INDEX_NAME, index)
        return [*names, WEIGHTS_INDEX_NAME]


class DeltaFiles:
    """Read access to the stored tensors of a delta directory, checked against its manifest."""

    def __init__(self, directory: str | Path, manifest: Manifest) -> None:
        self.directory = Path(directory)
        index_path = member(self.directory, WEIGHTS_INDEX_NAME, what="delta index", missing_ok=True)
        single = member(self.directory, WEIGHTS_NAME, what="delta weights", missing_ok=True)
        self._by_key: dict[str, SafetensorsFile] = {}
        if index_path is not None:
            raw = index_path.read_bytes()
            check_file_bytes(raw, WEIGHTS_INDEX_NAME, manifest, index_path)
            try:
                weight_map = json.loads(raw.decode("utf-8"))["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                    raise TypeError("weight_map must map stored tensor names to file names")
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CorruptFileError(f"not a valid delta index ({str(exc)[:200]})", path=index_path) from None
            for fname in set(weight_map.values()):
                if not (is_delta_weights_name(fname) and fname.endswith(".safetensors")):
                    raise UnsafePathError(f"weight_map names {fname[:80]!r}, not a delta shard (delta-NNNNN-of-MMMMM.safetensors)",
                                          path=index_path)
            files = {name: SafetensorsFile(member(self.directory, name, what="delta shard"))  # type: ignore[arg-type]
                     for name in sorted(set(weight_map.values()))}
            for key, fname in weight_map.items():
                if key not in files[fname].tensors:
                    raise CorruptFileError(f"index says {key!r} is in {fname}, but it is not there", path=index_path)
                self._by_key[key] = files[fname]
        elif single is not None:
            f = SafetensorsFile(single)
            self._by_key = dict.fromkeys(f.tensors, f)
        else:
            raise MissingFileError(f"no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}", path=self.directory)
        #: stored tensor name -> (tensor name, role, recorded digest), for the keys that have a digest.
        self._digests: dict[str, tuple[str, str, str]] = {}
        for name, entry in manifest.tensors.items():
            for role, key in entry.stored.items():
                if key not in self._by_key:
                    raise ManifestError(
                        f"manifest entry {name!r} names stored tensor {key!r} ({role}), which no delta file contains",
                        path=self.directory,
                    )
                if role in entry.digests:
                    self._digests[key] = (name, role, entry.digests[role])
        # Stored tensors verified before, in files unchanged since (the base's digest cache, one entry per delta
        # file): a delta loaded again (a server restart, a repeated apply) is not hashed again.
        self._files = list({id(f): f for f in self._by_key.values()}.values())  # each file once
        self._verified = CheckpointDigests(self._files)

    def stored(self, keys: dict[str, str]) -> dict[str, torch.Tensor]:
        """Read the stored tensors of one entry, keyed by role, each checked against its digest
        (when the manifest records one) before anything decodes it."""
        out = {}
        for role, key in keys.items():
            f = self._by_key[key]
            info = f.tensors[key]
            raw = f.read_bytes(key)
            if key in self._digests:
                tname, trole, expected = self._digests[key]
                if not self._known_good(key, expected):
                    check_tensor(expected, info.dtype, info.shape, memoryview(raw.numpy()), tensor=tname, key=key, role=trole, path=f.path)
                    if expected.startswith("sha256:"):
                        self._verified.put(key, expected[7:])
            out[role] = bytes_to_tensor(raw, info.dtype, info.shape)
        return out

    def _known_good(self, key: str, expected: str) -> bool:
        """The stored tensor ``key`` was hashed to ``expected`` before (digest cache) and its file has not changed
        since, checked after its bytes were read: they are the bytes that were hashed."""
        if not expected.startswith("sha256:") or self._verified.get(key) != expected[7:]:
            return False
        return not self._verified.file_changed(key)

    def metadata(self) -> list[dict[str, str]]:
        """The ``__metadata__`` of every delta file."""
        return [f.metadata for f in self._files]

    def close(self) -> None:
        self._verified.save()
        for f in self._files:
            f.close()

    def infos(self, keys: dict[str, str]) -> dict[str, TensorInfo]:
        """The header entries (dtype, shape, byte range) of one entry's stored tensors, keyed by role; reads nothing."""
        return {role: self._by_key[key].tensors[key] for role, key in keys.items()}
