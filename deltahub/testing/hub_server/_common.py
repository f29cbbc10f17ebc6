"""Constants, errors and small helpers shared by the Hub server modules."""

from __future__ import annotations

import fnmatch
import hashlib
import ipaddress
import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

logger = logging.getLogger("deltahub.testing.hub_server")

DEFAULT_BRANCH = "main"
DEFAULT_USERNAME = "user"
#: Files strictly larger than this are uploaded through LFS (the brief's "> 1 MB" rule).
DEFAULT_LFS_THRESHOLD = 1_000_000
#: Upper bound for JSON / NDJSON request bodies (commit payloads carry base64 regular files).
DEFAULT_MAX_BODY_BYTES = 512 * 1024 * 1024
#: Upper bound for a single LFS object upload (streamed to disk, never held in memory).
DEFAULT_MAX_UPLOAD_BYTES = 50 * 1000**3
#: Socket timeout per connection: a stalled client cannot pin a handler thread forever.
DEFAULT_REQUEST_TIMEOUT = 120.0
#: Lifetime of the signed LFS upload URLs handed out by the batch endpoint.
UPLOAD_URL_TTL_SECONDS = 3600

_COPY_CHUNK = 1024 * 1024

# Plural URL segment <-> repo type, and the URL prefix used in web / resolve / .git URLs.
PLURAL_TO_TYPE: dict[str, str] = {"models": "model", "datasets": "dataset"}
TYPE_TO_PLURAL: dict[str, str] = {v: k for k, v in PLURAL_TO_TYPE.items()}
TYPE_URL_PREFIX: dict[str, str] = {"model": "", "dataset": "datasets/"}

# Same LFS patterns as the .gitattributes the Hub writes into new repos.
LFS_PATTERNS: tuple[str, ...] = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib",
    "*.lfs.*", "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot",
    "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors",
    "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
    "*.gguf",
)  # fmt: skip
GITATTRIBUTES: bytes = (
    "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS)
    + "saved_model/**/* filter=lfs diff=lfs merge=lfs -text\n"
).encode()

_NAME_RE = re.compile(r"^\w(?:[\w.-]{0,94}\w)?$", re.ASCII)
_REF_RE = re.compile(r"^[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
_SHORT_SHA_RE = re.compile(r"^[0-9a-f]{5,39}$")
_PR_RE = re.compile(r"^refs/pr/(\d+)$")
_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)
_HOST_HEADER_RE = re.compile(r"^[A-Za-z0-9.\-\[\]:]+$")

# Second URL segment names that are API actions, not the name half of "<ns>/<name>".
_API_ACTIONS = frozenset(
    {"revision", "tree", "refs", "commits", "commit", "branch", "tag", "preupload", "paths-info", "settings"}
)  # fmt: skip

FileEntry = dict[str, Any]  # {"oid_sha256": str, "git_sha1": str, "size": int, "lfs": bool}
Commit = dict[str, Any]


class HubError(Exception):
    """An error answered to the client as JSON ``{"error": ...}`` plus ``X-Error-*`` headers.

    ``code`` becomes ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``),
    which ``huggingface_hub.utils.hf_raise_for_status`` maps to its typed exceptions.
    """

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})  # additional JSON body fields (e.g. "url" on a 409 create)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (127.0.0.0/8, ::1); no DNS lookups."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _now_iso() -> str:
    """Current UTC time in the Hub's format (``2024-01-02T03:04:05.678Z``)."""
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def git_blob_sha1(data: bytes) -> str:
    """Git blob id of ``data`` (what the Hub reports as ``oid``/``blobId`` for regular files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    """The git-lfs pointer file stored in git in place of an LFS object."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def _read_json(path: Path) -> Any:
    with open(path, "rb") as f:
        return json.loads(f.read())


def validate_repo_path(path: str) -> str:
    """Validate a file path inside a repo (no traversal, no ``.git``); returns it unchanged."""
    if not path or len(path) > 1024 or "\x00" in path or "\\" in path or path.startswith("/"):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    for part in path.split("/"):
        if part in ("", ".", "..", ".git"):
            raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


def _validate_ref_name(name: str, what: str) -> str:
    if (
        not name
        or len(name) > 200
        or not _REF_RE.match(name)
        or ".." in name
        or name.startswith("refs/")
        or name.endswith(".lock")
        or _SHA1_RE.match(name)
    ):
        raise HubError(400, f"Invalid {what} name: {name!r}")
    return name


def is_lfs_path(path: str) -> bool:
    """Whether ``path`` matches one of the default ``.gitattributes`` LFS patterns."""
    base = path.rsplit("/", 1)[-1]
    if path.startswith("saved_model/"):
        return True
    return any(fnmatch.fnmatchcase(base, pattern) for pattern in LFS_PATTERNS)


@dataclass(frozen=True)
class RepoKey:
    """Identifies a repo: type (``model`` or ``dataset``; Spaces are not served), namespace and name."""

    type: str
    namespace: str
    name: str

    @property
    def id(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def plural(self) -> str:
        return TYPE_TO_PLURAL[self.type]

    @property
    def url_prefix(self) -> str:
        """Prefix of web / resolve / ``.git`` URLs: ``""`` or ``"datasets/"``."""
        return TYPE_URL_PREFIX[self.type]

    @classmethod
    def parse(cls, repo_type: str, repo_id: str, default_namespace: str) -> RepoKey:
        """Build and validate a key from ``"ns/name"`` or ``"name"`` (-> default namespace)."""
        if repo_type not in TYPE_TO_PLURAL:
            raise HubError(400, f"Unsupported repo type: {repo_type!r}")
        parts = repo_id.split("/")
        if len(parts) == 1:
            namespace, name = default_namespace, parts[0]
        elif len(parts) == 2:
            namespace, name = parts
        else:
            raise HubError(400, f"Invalid repo id: {repo_id!r}")
        for part in (namespace, name):
            if not _NAME_RE.match(part) or "--" in part or ".." in part:
                raise HubError(400, f"Invalid repo id: {repo_id!r}")
        return cls(repo_type, namespace, name)


def _truthy(values: Sequence[str] | None) -> bool:
    """Query/form flag parsing: ``1``, ``true``, ``True``, ``yes`` (last value wins)."""
    if not values:
        return False
    return values[-1].strip().lower() in ("1", "true", "yes", "on")


def _parse_range(header: str, size: int) -> tuple[int, int] | str | None:
    """Parse a single ``bytes=`` range. None = ignore (serve all), ``"unsatisfiable"`` = 416."""
    m = _RANGE_RE.match(header)
    if not m:
        return None  # multi-range or unknown unit: RFC 9110 allows ignoring Range
    first, last = m.groups()
    if not first and not last:
        return None
    if not first:
        suffix = int(last)
        if suffix == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - suffix), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if start >= size or end < start:
        return "unsatisfiable"
    return start, min(end, size - 1)


