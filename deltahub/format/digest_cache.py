"""A local cache of base tensors' sha256, so a base is hashed once, not on every apply / compress.

The digests are what ``base_sha256`` and the fingerprint (format_spec.md §5) are computed from;
the cache only saves recomputing them. One JSON file per weights file, under
:func:`digest_cache_dir`, keyed like git's index by the file's identity: ``(st_dev, st_ino,
st_size, st_mtime_ns, st_ctime_ns)`` (plus, for a Hub-cache blob, its name, which is the sha256 of
its content). Any change to the file (a rewrite, a ``touch``, a copy over it, a rename of another
file onto its path) changes the identity and the entry is ignored; entries are written only for
files that did not change while they were hashed and whose last change is older than
:data:`RACY_WINDOW_NS` (a write in the same clock tick as the stat could go unnoticed).

What the cache may skip: hashing bytes whose file is provably unchanged since they were hashed.
What it may not: a cache file that is not this user's regular file, not valid JSON of this
schema, or whose self-checksum fails is ignored (never an error); the caller still checks the
digests against the delta and re-stats the file at the end, so a wrong base is still refused.
Like git's index, someone who can write your cache (and forge the checksum) and set a file's
ctime could hide a change: the cache is as trusted as your home directory (README, Security).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import BaseMismatchError

#: Schema tag of a cache file; a file with another tag is ignored.
CACHE_FORMAT = "deltahub-digests/1"
#: A file changed this shortly before it was stat'ed (mtime or ctime) is hashed but not cached (racy-git rule).
RACY_WINDOW_NS = 2_000_000_000
_MAX_CACHE_FILE = 64 * 2**20
_HEX64 = re.compile(r"[0-9a-f]{64}")

Identity = tuple[int, int, int, int, int]


def digest_cache_dir() -> Path | None:
    """Where digest files live: ``$DELTAHUB_DIGEST_CACHE``, else ``$DELTAHUB_CACHE/digests``, else
    ``deltahub/digests`` next to the Hub cache (``HF_HUB_CACHE``'s sibling, like rebuilt models).
    ``DELTAHUB_DIGEST_CACHE=0`` (or ``off``) disables the cache: None."""
    own = os.environ.get("DELTAHUB_DIGEST_CACHE")
    if own:
        return None if own.lower() in ("0", "off", "false", "no") else Path(own)
    env = os.environ.get("DELTAHUB_CACHE")
    if env:
        return Path(env) / "digests"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser().resolve().parent / "deltahub" / "digests"


def file_identity(path: str | Path) -> Identity | None:
    """``(dev, ino, size, mtime_ns, ctime_ns)`` of ``path`` (symlinks followed), None when unreadable."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _cache_name(real: Path, size: int) -> str:
    """A Hub-cache blob (``.../blobs/<sha256>``) is named by its content address; any other file by its path."""
    if real.parent.name == "blobs" and _HEX64.fullmatch(real.name):
        return f"blob-{real.name}-{size}.json"
    return "file-" + hashlib.sha256(os.fsencode(real)).hexdigest()[:40] + ".json"


def _checksum(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class FileDigests:
    """The cached digests of one weights file: ``get`` what is known, ``put`` what was computed, ``save``.

    ``spans`` maps tensor name -> ``(start, nbytes)`` in the file; a cached digest is used only for
    a tensor at the same byte range."""

    def __init__(self, path: str | Path, spans: dict[str, tuple[int, int]], cache_dir: Path | None = None) -> None:
        self.path = Path(os.path.realpath(path))
        self.spans = spans
        self._stat_time = time.time_ns()
        self.identity = file_identity(self.path)
        self.dir = cache_dir if cache_dir is not None else digest_cache_dir()
        self.known: dict[str, str] = {}
        self._new = False
        if self.dir is not None and self.identity is not None:
            self.known = self._load()

    @property
    def cache_file(self) -> Path | None:
        if self.dir is None or self.identity is None:
            return None
        return self.dir / _cache_name(self.path, self.identity[2])

    def _load(self) -> dict[str, str]:
        """The valid cached digests for the current identity; anything odd about the cache file: {}."""
        f = self.cache_file
        try:
            fd = os.open(f, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))  # type: ignore[arg-type]
        except OSError:
            return {}
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_CACHE_FILE or (hasattr(os, "getuid") and st.st_uid != os.getuid()):
                return {}
            with os.fdopen(os.dup(fd), "rb") as fh:
                doc = json.loads(fh.read().decode("utf-8"))
        except (OSError, ValueError, RecursionError):
            return {}
        finally:
            os.close(fd)
        return self._valid_entries(doc)

    def _valid_entries(self, doc: Any) -> dict[str, str]:
        if not isinstance(doc, dict) or not isinstance(doc.get("checksum"), str):
            return {}
        body = {k: v for k, v in doc.items() if k != "checksum"}
        if (doc["checksum"] != _checksum(body) or body.get("format") != CACHE_FORMAT or body.get("path") != str(self.path)
                or body.get("identity") != list(self.identity or ()) or not isinstance(body.get("tensors"), dict)):
            return {}
        out = {}
        for name, rec in body["tensors"].items():
            if (isinstance(rec, list) and len(rec) == 3 and name in self.spans and rec[:2] == list(self.spans[name])
                    and isinstance(rec[2], str) and _HEX64.fullmatch(rec[2])):
                out[name] = rec[2]
        return out

    def get(self, name: str) -> str | None:
        return self.known.get(name)

    def put(self, name: str, digest: str) -> None:
        if self.known.get(name) != digest:
            self.known[name] = digest
            self._new = True

    def unchanged(self) -> bool:
        """The file still has the identity it had when this object was made."""
        return self.identity is not None and file_identity(self.path) == self.identity

    def save(self) -> None:
        """Write the digests atomically when something new was learned, the file did not change meanwhile
        and its last change is not racy; a cache that cannot be written is skipped silently (it is a speed-up)."""
        f = self.cache_file
        if f is None or not self._new or not self.unchanged():
            return
        assert self.identity is not None
        if max(self.identity[3], self.identity[4]) > self._stat_time - RACY_WINDOW_NS:
            return  # changed in the same clock tick as the stat: a later write could keep the identity
        body = {"format": CACHE_FORMAT, "path": str(self.path), "identity": list(self.identity),
                "tensors": {n: [*self.spans[n], d] for n, d in sorted(self.known.items()) if n in self.spans}}
        tmp = f.with_name(f".{f.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
        with contextlib.suppress(OSError):
            f.parent.mkdir(parents=True, exist_ok=True)
            try:
                tmp.write_text(json.dumps({**body, "checksum": _checksum(body)}, separators=(",", ":")))
                os.replace(tmp, f)
                self._new = False
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


class CheckpointDigests:
    """:class:`FileDigests` for every file of a checkpoint, by tensor name."""

    def __init__(self, files: list[Any], cache_dir: Path | None = None) -> None:
        """``files``: the checkpoint's :class:`~deltahub.format.io.SafetensorsFile` objects."""
        self._by_name: dict[str, FileDigests] = {}
        self.files: list[FileDigests] = []
        for sf in files:
            fd = FileDigests(sf.path, {n: (i.start, i.nbytes) for n, i in sf.tensors.items()}, cache_dir)
            self.files.append(fd)
            self._by_name.update(dict.fromkeys(sf.tensors, fd))

    def get(self, name: str) -> str | None:
        return self._by_name[name].get(name)

    def put(self, name: str, digest: str) -> None:
        self._by_name[name].put(name, digest)

    def file_changed(self, name: str) -> bool:
        """Whether the file holding ``name`` changed since the cache was read."""
        return not self._by_name[name].unchanged()

    def changed_files(self) -> list[Path]:
        """Files whose identity changed since the cache was read (their bytes may not be what was hashed)."""
        return [f.path for f in self.files if not f.unchanged()]

    def save(self) -> None:
        for f in self.files:
            f.save()

    def check_unchanged(self, where: str | Path | None = None) -> None:
        """:class:`BaseMismatchError` when a file changed since the cache was read: the bytes used may then
        not be the ones the (cached or computed) digests describe."""
        changed = self.changed_files()
        if changed:
            raise BaseMismatchError(f"base file {changed[0].name} changed while it was being read; run again", path=where or changed[0])


def digest_or_compute(cache: CheckpointDigests | None, name: str, compute: Callable[[], str]) -> str:
    """The cached digest of ``name``, else ``compute()`` (remembered for :meth:`CheckpointDigests.save`)."""
    if cache is not None:
        d = cache.get(name)
        if d is not None:
            return d
    d = compute()
    if cache is not None:
        cache.put(name, d)
    return d
