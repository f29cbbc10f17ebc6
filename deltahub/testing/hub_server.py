"""A small Hugging Face Hub-compatible HTTP server (standard library only).

Why: deltahub pushes and pulls through the real ``huggingface_hub`` client. Tests (and offline
development) need a hermetic Hub that speaks the same HTTP API: repo creation, the
preupload / LFS-batch / commit upload flow, branches and tags, repo info and tree listings,
and ``/resolve`` downloads with ``Range`` support. This module provides exactly that, backed
by a plain directory so repos persist across restarts.

The wire format follows what ``huggingface_hub`` 2.4.0 sends and parses (checked against its
``hf_api.py``, ``_commit_api.py``, ``lfs.py``, ``file_download.py``, ``_snapshot_download.py``
and ``utils/_http.py``). Uploads must use the legacy LFS path, i.e. the client must run with
``HF_HUB_DISABLE_XET=1`` (or ``huggingface_hub.constants.HF_HUB_DISABLE_XET = True``); this
server does not implement Xet storage.

On-disk layout under ``root``::

    blobs/<sha256>                         file contents (regular and LFS), content addressed
    tmp/                                   partial uploads / atomic-write temp files
    repos/<models|datasets|spaces>/<ns>/<name>/
        repo.json                          {"id", "type", "private", "createdAt", ...}
        refs.json                          {"branches": {}, "tags": {}, "prs": {}} -> commit sha
        commits/<sha>.json                 {"id", "parent", "title", "message", "date", "author",
                                            "files": {path: {"oid_sha256", "git_sha1", "size", "lfs"}}}

Every write goes through a temp file + ``os.replace`` and repo mutations are serialised by a
lock, so concurrent requests never observe half-written state. Commits are never deleted:
any old commit sha stays resolvable forever.

Behaviour worth knowing (mirrors the real Hub):

* A new repo starts with an "initial commit" containing a ``.gitattributes`` file.
* A repo id without namespace (``"name"``) is treated as ``"<username>/name"`` (the Hub puts
  such repos in the caller's namespace, and the client cannot parse single-segment repo URLs).
* With ``token`` set: every write needs ``Authorization: Bearer <token>``; private repos are
  only readable with it (otherwise 401 + ``X-Error-Code: RepoNotFound``, which the client maps
  to ``RepositoryNotFoundError``); a wrong token gets 401 "Invalid credentials in Authorization
  header" everywhere. Without ``token`` the server is open and accepts any/no credentials.

Run standalone: ``python -m deltahub.testing.hub_server --root DIR [--port N] [--token T]``.
"""

from __future__ import annotations

import argparse
import base64
import fnmatch
import hashlib
import hmac
import html
import ipaddress
import json
import logging
import mimetypes
import os
import re
import secrets
import shutil
import signal
import socket
import socketserver
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["HubError", "HubServer", "HubStore", "RepoKey", "is_loopback_host", "main"]

logger = logging.getLogger(__name__)

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
PLURAL_TO_TYPE: dict[str, str] = {"models": "model", "datasets": "dataset", "spaces": "space"}
TYPE_TO_PLURAL: dict[str, str] = {v: k for k, v in PLURAL_TO_TYPE.items()}
TYPE_URL_PREFIX: dict[str, str] = {"model": "", "dataset": "datasets/", "space": "spaces/"}

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
    {"revision", "tree", "refs", "commits", "commit", "branch", "tag", "preupload", "paths-info",
     "settings", "resolve", "lfs-files", "discussions", "treesize", "xet-write-token", "xet-read-token"}
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


# --------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RepoKey:
    """Identifies a repo: type (``model``/``dataset``/``space``), namespace and name."""

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
        """Prefix of web / resolve / ``.git`` URLs: ``""``, ``"datasets/"`` or ``"spaces/"``."""
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


class HubStore:
    """Disk-backed repos, refs, commits and content-addressed blobs (thread-safe).

    Mutations of repos/refs happen under one lock; every file is written atomically and
    commit/blob files are immutable, so readers need no lock.
    """

    def __init__(self, root: str | os.PathLike[str], username: str = DEFAULT_USERNAME) -> None:
        self.root = Path(root).resolve()
        self.username = username
        self.blobs_dir = self.root / "blobs"
        self.tmp_dir = self.root / "tmp"
        self.repos_dir = self.root / "repos"
        for d in (self.blobs_dir, self.tmp_dir, self.repos_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()

    # ---- blobs -------------------------------------------------------------------------

    def blob_path(self, oid: str) -> Path:
        """Path of the blob with sha256 ``oid`` (validated: no traversal possible)."""
        if not _SHA256_RE.match(oid):
            raise HubError(400, f"Invalid sha256 oid: {oid!r}")
        return self.blobs_dir / oid

    def blob_size(self, oid: str) -> int | None:
        """Size of a stored blob, or None if absent."""
        try:
            return self.blob_path(oid).stat().st_size
        except FileNotFoundError:
            return None

    def put_blob_bytes(self, data: bytes) -> str:
        """Store ``data`` (idempotent) and return its sha256."""
        oid = hashlib.sha256(data).hexdigest()
        path = self.blob_path(oid)
        if not path.exists():
            _atomic_write_bytes(path, data)
        return oid

    def put_blob_stream(self, chunks: Iterable[bytes], oid: str, size: int) -> None:
        """Stream an upload to disk, verifying its sha256 and size before publishing it."""
        target = self.blob_path(oid)
        hasher = hashlib.sha256()
        received = 0
        fd, tmp = tempfile.mkstemp(dir=self.tmp_dir, prefix=f"{oid}.", suffix=".upload")
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    received += len(chunk)
                    if received > size:
                        raise HubError(400, f"Upload is larger than the declared size {size}")
                    hasher.update(chunk)
                    f.write(chunk)
            if received != size:
                raise HubError(400, f"Upload size mismatch: expected {size} bytes, got {received}")
            if hasher.hexdigest() != oid:
                raise HubError(400, f"Upload sha256 mismatch: expected {oid}, got {hasher.hexdigest()}")
            os.replace(tmp, target)
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    # ---- repos -------------------------------------------------------------------------

    def repo_dir(self, key: RepoKey) -> Path:
        return self.repos_dir / key.plural / key.namespace / key.name

    def load_repo(self, key: RepoKey) -> dict[str, Any]:
        """Repo metadata; 404 ``RepoNotFound`` if the repo does not exist."""
        try:
            return _read_json(self.repo_dir(key) / "repo.json")
        except FileNotFoundError:
            raise HubError(404, f"Repository not found: {key.plural}/{key.id}", "RepoNotFound") from None

    def create_repo(self, key: RepoKey, *, private: bool, author: str, extra: Mapping[str, Any] | None = None) -> None:
        """Create a repo with an initial commit holding ``.gitattributes``; 409 if it exists."""
        with self._lock:
            rdir = self.repo_dir(key)
            if (rdir / "repo.json").exists():
                raise HubError(409, f"You already created this {key.type} repo: {key.id}")
            oid = self.put_blob_bytes(GITATTRIBUTES)
            files = {
                ".gitattributes": {
                    "oid_sha256": oid,
                    "git_sha1": git_blob_sha1(GITATTRIBUTES),
                    "size": len(GITATTRIBUTES),
                    "lfs": False,
                }
            }
            sha = self._write_commit(key, parent=None, title="initial commit", message="", files=files, author=author)
            _atomic_write_json(rdir / "refs.json", {"branches": {DEFAULT_BRANCH: sha}, "tags": {}, "prs": {}})
            meta = {
                "_id": hashlib.sha1(f"{key.type}:{key.id}:{time.time_ns()}".encode()).hexdigest()[:24],
                "id": key.id,
                "type": key.type,
                "private": private,
                "createdAt": _now_iso(),
                **(extra or {}),
            }
            # repo.json last: its presence marks the repo as complete.
            _atomic_write_json(rdir / "repo.json", meta)

    def delete_repo(self, key: RepoKey) -> None:
        """Delete a repo's metadata, refs and commits (blobs are shared and kept)."""
        with self._lock:
            self.load_repo(key)
            rdir = self.repo_dir(key)
            # Move aside first so a concurrent reader sees either the whole repo or nothing.
            trash = self.tmp_dir / f"deleted-{key.plural}-{key.namespace}-{key.name}-{secrets.token_hex(6)}"
            os.replace(rdir, trash)
            _rmtree(trash)

    def update_repo(self, key: RepoKey, **changes: Any) -> dict[str, Any]:
        """Update fields of ``repo.json`` (e.g. ``private``)."""
        with self._lock:
            meta = self.load_repo(key)
            meta.update(changes)
            _atomic_write_json(self.repo_dir(key) / "repo.json", meta)
            return meta

    def list_repos(self, repo_type: str) -> list[tuple[RepoKey, dict[str, Any]]]:
        """All repos of a type, sorted by id."""
        out: list[tuple[RepoKey, dict[str, Any]]] = []
        base = self.repos_dir / TYPE_TO_PLURAL[repo_type]
        if not base.is_dir():
            return out
        for ns_dir in sorted(base.iterdir()):
            if not ns_dir.is_dir():
                continue
            for name_dir in sorted(ns_dir.iterdir()):
                meta_path = name_dir / "repo.json"
                if meta_path.is_file():
                    out.append((RepoKey(repo_type, ns_dir.name, name_dir.name), _read_json(meta_path)))
        return out

    # ---- refs & commits ----------------------------------------------------------------

    def load_refs(self, key: RepoKey) -> dict[str, dict[str, str]]:
        self.load_repo(key)
        refs = _read_json(self.repo_dir(key) / "refs.json")
        for kind in ("branches", "tags", "prs"):
            refs.setdefault(kind, {})
        return refs

    def _save_refs(self, key: RepoKey, refs: Mapping[str, Any]) -> None:
        _atomic_write_json(self.repo_dir(key) / "refs.json", refs)

    def load_commit(self, key: RepoKey, sha: str) -> Commit | None:
        if not _SHA1_RE.match(sha):
            return None
        try:
            return _read_json(self.repo_dir(key) / "commits" / f"{sha}.json")
        except FileNotFoundError:
            return None

    def _write_commit(
        self, key: RepoKey, *, parent: str | None, title: str, message: str, files: Mapping[str, FileEntry], author: str
    ) -> str:
        """Write an immutable commit object; its id is the sha1 of its canonical JSON."""
        doc: Commit = {
            "parent": parent,
            "title": title,
            "message": message,
            "date": _now_iso(),
            "author": author,
            "files": {p: dict(files[p]) for p in sorted(files)},
        }
        sha = hashlib.sha1(_canonical_json(doc)).hexdigest()
        doc["id"] = sha
        path = self.repo_dir(key) / "commits" / f"{sha}.json"
        if not path.exists():
            _atomic_write_json(path, doc)
        return sha

    def resolve(self, key: RepoKey, revision: str) -> tuple[str, Commit]:
        """Resolve a branch / tag / ``refs/pr/N`` / (short) commit sha to ``(sha, commit)``."""
        refs = self.load_refs(key)
        sha: str | None = None
        rev = revision
        if rev.startswith("refs/heads/"):
            sha = refs["branches"].get(rev[len("refs/heads/") :])
        elif rev.startswith("refs/tags/"):
            sha = refs["tags"].get(rev[len("refs/tags/") :])
        elif m := _PR_RE.match(rev):
            sha = refs["prs"].get(m.group(1))
        elif rev in refs["branches"]:
            sha = refs["branches"][rev]
        elif rev in refs["tags"]:
            sha = refs["tags"][rev]
        elif _SHA1_RE.match(rev):
            sha = rev if (self.repo_dir(key) / "commits" / f"{rev}.json").exists() else None
        elif _SHORT_SHA_RE.match(rev):
            matches = [p.stem for p in (self.repo_dir(key) / "commits").glob(f"{rev}*.json")]
            sha = matches[0] if len(matches) == 1 else None
        commit = self.load_commit(key, sha) if sha else None
        if sha is None or commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha, commit

    def history(self, key: RepoKey, sha: str) -> list[Commit]:
        """Commits reachable from ``sha`` following first parents, newest first."""
        out: list[Commit] = []
        current: str | None = sha
        while current:
            commit = self.load_commit(key, current)
            if commit is None:
                break
            out.append(commit)
            current = commit.get("parent")
        return out

    def commit(
        self,
        key: RepoKey,
        revision: str,
        *,
        title: str,
        message: str,
        operations: Sequence[Mapping[str, Any]],
        author: str,
        parent_commit: str | None = None,
        create_pr: bool = False,
    ) -> tuple[str, int | None]:
        """Apply ``operations`` on top of ``revision`` and advance its ref.

        Operations: ``{"op": "file", "path", "content": bytes}``, ``{"op": "lfsFile", "path",
        "oid", "size"}``, ``{"op": "deletedFile", "path"}``, ``{"op": "deletedFolder", "path"}``.
        With ``create_pr`` a new ``refs/pr/N`` is created from ``revision`` (or ``parent_commit``)
        and the commit lands there. Returns ``(commit_sha, pr_number_or_None)``.
        """
        with self._lock:
            refs = self.load_refs(key)
            pr_num: int | None = None
            if create_pr:
                base_sha, _ = self.resolve(key, parent_commit or revision)
                pr_num = max((int(n) for n in refs["prs"]), default=0) + 1
                kind, ref_name, head = "prs", str(pr_num), base_sha
            else:
                kind, ref_name = self._writable_ref(key, refs, revision)
                head = refs[kind][ref_name]
                if parent_commit and not head.startswith(parent_commit.lower()):
                    raise HubError(
                        412,
                        f"A commit has happened since. Please refresh and try again. "
                        f"(expected parent {parent_commit}, {revision} is at {head})",
                    )
            head_commit = self.load_commit(key, head)
            if head_commit is None:
                raise HubError(500, f"Corrupted repository: missing commit {head}")
            files: dict[str, FileEntry] = dict(head_commit["files"])
            for op in operations:
                self._apply_operation(files, op)
            _check_path_conflicts(files)
            sha = self._write_commit(key, parent=head, title=title, message=message, files=files, author=author)
            refs[kind][ref_name] = sha
            self._save_refs(key, refs)
            return sha, pr_num

    def _writable_ref(self, key: RepoKey, refs: Mapping[str, Mapping[str, str]], revision: str) -> tuple[str, str]:
        """Map a revision to ``(kind, name)`` of a ref that can receive commits (branch or PR)."""
        if revision.startswith("refs/heads/"):
            revision = revision[len("refs/heads/") :]
        if revision in refs["branches"]:
            return "branches", revision
        if (m := _PR_RE.match(revision)) and m.group(1) in refs["prs"]:
            return "prs", m.group(1)
        self.resolve(key, revision)  # 404 RevisionNotFound when it does not exist at all
        raise HubError(400, f"Invalid rev id: {revision} is not a branch; commits can only be made to a branch")

    def _apply_operation(self, files: dict[str, FileEntry], op: Mapping[str, Any]) -> None:
        kind = op["op"]
        path = validate_repo_path(str(op["path"]))
        if kind == "file":
            content: bytes = op["content"]
            files[path] = {
                "oid_sha256": self.put_blob_bytes(content),
                "git_sha1": git_blob_sha1(content),
                "size": len(content),
                "lfs": False,
            }
        elif kind == "lfsFile":
            oid = str(op["oid"]).lower()
            stored = self.blob_size(oid)
            if stored is None:
                raise HubError(400, f"LFS object {oid} for {path!r} was not uploaded; upload it before committing")
            if op.get("size") is not None and int(op["size"]) != stored:
                raise HubError(400, f"LFS object {oid} has size {stored}, commit says {op['size']}")
            files[path] = {
                "oid_sha256": oid,
                "git_sha1": git_blob_sha1(lfs_pointer(oid, stored)),
                "size": stored,
                "lfs": True,
            }
        elif kind == "deletedFile":
            if path not in files:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            del files[path]
        elif kind == "deletedFolder":
            prefix = path.rstrip("/") + "/"
            doomed = [p for p in files if p.startswith(prefix)]
            if not doomed:
                raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
            for p in doomed:
                del files[p]
        else:
            raise HubError(400, f"Unknown commit operation: {kind!r}")

    def create_branch(self, key: RepoKey, branch: str, starting_point: str | None, author: str) -> str:
        """Create ``branch`` at ``starting_point`` (default: head of main); 409 if it exists."""
        del author  # branches are plain refs; kept for symmetry with other mutations
        _validate_ref_name(branch, "branch")
        with self._lock:
            refs = self.load_refs(key)
            if branch in refs["branches"]:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            sha, _ = self.resolve(key, starting_point or DEFAULT_BRANCH)
            refs["branches"][branch] = sha
            self._save_refs(key, refs)
            return sha

    def delete_branch(self, key: RepoKey, branch: str) -> None:
        with self._lock:
            refs = self.load_refs(key)
            if branch not in refs["branches"]:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            if branch == DEFAULT_BRANCH:
                raise HubError(403, "Cannot delete the default branch")
            del refs["branches"][branch]
            self._save_refs(key, refs)

    def create_tag(self, key: RepoKey, tag: str, revision: str) -> str:
        _validate_ref_name(tag, "tag")
        with self._lock:
            refs = self.load_refs(key)
            if tag in refs["tags"]:
                raise HubError(409, f"Tag already exists: {tag}")
            sha, _ = self.resolve(key, revision)
            refs["tags"][tag] = sha
            self._save_refs(key, refs)
            return sha

    def delete_tag(self, key: RepoKey, tag: str) -> None:
        with self._lock:
            refs = self.load_refs(key)
            if tag not in refs["tags"]:
                raise HubError(404, f"Invalid rev id: {tag}", "RevisionNotFound")
            del refs["tags"][tag]
            self._save_refs(key, refs)


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _check_path_conflicts(files: Mapping[str, FileEntry]) -> None:
    """Reject trees where a path is both a file and a folder (impossible in git)."""
    for path in files:
        parts = path.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in files:
                raise HubError(400, f"Path conflict: {'/'.join(parts[:i])!r} is a file and a folder")


# --------------------------------------------------------------------------------------------
# JSON views (field names as parsed by huggingface_hub.hf_api)
# --------------------------------------------------------------------------------------------


def _file_json(path: str, entry: FileEntry) -> dict[str, Any]:
    """A ``RepoFile`` as returned by the tree / paths-info endpoints."""
    out: dict[str, Any] = {"type": "file", "oid": entry["git_sha1"], "size": entry["size"], "path": path}
    if entry["lfs"]:
        out["lfs"] = {
            "oid": entry["oid_sha256"],
            "size": entry["size"],
            "pointerSize": len(lfs_pointer(entry["oid_sha256"], entry["size"])),
        }
    return out


def _dir_oid(files: Mapping[str, FileEntry], directory: str) -> str:
    prefix = directory + "/"
    listing = "\n".join(f"{p} {files[p]['git_sha1']}" for p in sorted(files) if p.startswith(prefix))
    return hashlib.sha1(f"tree {directory}\n{listing}".encode()).hexdigest()


def _dir_json(files: Mapping[str, FileEntry], directory: str) -> dict[str, Any]:
    return {"type": "directory", "oid": _dir_oid(files, directory), "size": 0, "path": directory}


def _tree_json(files: Mapping[str, FileEntry], base: str, recursive: bool) -> list[dict[str, Any]]:
    """Entries below ``base`` (direct children, or everything when ``recursive``)."""
    base = base.strip("/")
    prefix = f"{base}/" if base else ""
    if base and base in files:
        raise HubError(404, f"{base} is a file, not a directory", "EntryNotFound")
    dirs: set[str] = set()
    file_paths: list[str] = []
    for path in files:
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix) :].split("/")
        if recursive:
            file_paths.append(path)
            for i in range(1, len(parts)):
                dirs.add(prefix + "/".join(parts[:i]))
        elif len(parts) == 1:
            file_paths.append(path)
        else:
            dirs.add(prefix + parts[0])
    if base and not file_paths and not dirs:
        raise HubError(404, f"Entry not found: {base}", "EntryNotFound")
    entries = [_dir_json(files, d) for d in dirs] + [_file_json(p, files[p]) for p in file_paths]
    return sorted(entries, key=lambda e: e["path"])


def _last_commits(history: Sequence[Commit]) -> dict[str, Commit]:
    """For each path, the newest commit in ``history`` (newest first) that changed it."""
    out: dict[str, Commit] = {}
    for i, commit in enumerate(history):
        parent_files = history[i + 1]["files"] if i + 1 < len(history) else {}
        for path, entry in commit["files"].items():
            if path not in out and parent_files.get(path) != entry:
                out[path] = commit
    return out


# --------------------------------------------------------------------------------------------
# HTTP layer
# --------------------------------------------------------------------------------------------


class _HubHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that tracks live connections so ``stop()`` can cut them promptly."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: HubServer, family: int) -> None:
        self.address_family = family
        self.app = app
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _HubRequestHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind() calls socket.getfqdn(), a potentially slow reverse DNS lookup.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._connections_lock:
            conns = list(self._connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("Error while handling a request from %s", client_address, exc_info=True)


class _HubRequestHandler(BaseHTTPRequestHandler):
    """Routes Hub API requests to :class:`HubStore` (one instance per connection)."""

    protocol_version = "HTTP/1.1"
    server_version = "deltahub-hub-server/1.0"
    # Headers and body are separate writes: without TCP_NODELAY, Nagle + delayed ACK add ~40 ms per request.
    disable_nagle_algorithm = True
    server: _HubHTTPServer

    # ---- plumbing ----------------------------------------------------------------------

    def setup(self) -> None:
        self.timeout = self.server.app.request_timeout
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        logger.debug("%s - %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    @property
    def app(self) -> HubServer:
        return self.server.app

    @property
    def store(self) -> HubStore:
        return self.server.app.store

    def _handle(self, method: str) -> None:
        self._responded = False
        self._body_pending = self._has_body()
        try:
            self._route(method)
        except HubError as e:
            self._send_error(e, head_only=(method == "HEAD"))
        except (BrokenPipeError, ConnectionResetError, TimeoutError, socket.timeout):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - turn bugs into a JSON 500 instead of a dead socket
            logger.exception("Unhandled error for %s %s", method, self.path)
            if not self._responded:
                self._send_error(HubError(500, f"Internal server error: {type(e).__name__}: {e}"), method == "HEAD")
            self.close_connection = True
        finally:
            if self._body_pending:
                # The request body was not (fully) read: the connection cannot be reused safely.
                self.close_connection = True

    def _has_body(self) -> bool:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return True
        try:
            return int(self.headers.get("Content-Length") or 0) > 0
        except ValueError:
            return True

    def _iter_body(self, limit: int) -> Iterator[bytes]:
        """Yield the request body (Content-Length or chunked), never more than ``limit`` bytes."""
        rfile = self.rfile
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            total = 0
            while True:
                line = rfile.readline(1024)
                if not line.endswith(b"\n"):
                    raise HubError(400, "Malformed chunked body")
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise HubError(400, "Malformed chunk size") from None
                if size == 0:
                    while rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # skip trailers
                    break
                total += size
                if total > limit:
                    raise HubError(413, f"Request body exceeds {limit} bytes")
                remaining = size
                while remaining:
                    data = rfile.read(min(remaining, _COPY_CHUNK))
                    if not data:
                        raise HubError(400, "Truncated chunked body")
                    remaining -= len(data)
                    yield data
                rfile.readline(1024)  # CRLF after chunk data
        else:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                raise HubError(400, "Invalid Content-Length") from None
            if length < 0:
                raise HubError(400, "Invalid Content-Length")
            if length > limit:
                raise HubError(413, f"Request body exceeds {limit} bytes")
            remaining = length
            while remaining:
                data = rfile.read(min(remaining, _COPY_CHUNK))
                if not data:
                    raise HubError(400, "Truncated request body")
                remaining -= len(data)
                yield data
        self._body_pending = False

    def _read_body(self, limit: int | None = None) -> bytes:
        return b"".join(self._iter_body(self.app.max_body_bytes if limit is None else limit))

    def _read_json(self, *, required: bool = True) -> Any:
        raw = self._read_body()
        if not raw.strip():
            if required:
                raise HubError(400, "Expected a JSON body")
            return {}
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise HubError(400, "Malformed JSON body") from None

    def _send(
        self,
        status: int,
        body: bytes = b"",
        *,
        content_type: str = "application/json",
        headers: Mapping[str, str] | None = None,
        head_only: bool = False,
    ) -> None:
        self._responded = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self._body_pending:
            self.send_header("Connection", "close")
        self.end_headers()
        if body and not head_only:
            self.wfile.write(body)

    def _send_json(
        self, obj: Any, status: int = 200, *, headers: Mapping[str, str] | None = None, content_type: str | None = None
    ) -> None:
        self._send(
            status,
            json.dumps(obj).encode(),
            content_type=content_type or "application/json",
            headers=headers,
        )

    def _drain_small_body(self, limit: int = 1024 * 1024) -> None:
        """Read an unread body of known small size so the client sees our error reply, not EPIPE."""
        if not self._body_pending or "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return
        if 0 < length <= limit:
            try:
                for _ in self._iter_body(length):
                    pass
            except (HubError, OSError):
                pass

    def _send_error(self, err: HubError, head_only: bool = False) -> None:
        if self._responded:
            self.close_connection = True
            return
        self._drain_small_body()
        headers = dict(err.headers)
        safe_message = err.message.encode("ascii", "replace").decode()[:500].replace("\r", " ").replace("\n", " ")
        headers["X-Error-Message"] = safe_message
        if err.code:
            headers["X-Error-Code"] = err.code
        body = json.dumps({**err.extra, "error": err.message}).encode()
        self._send(err.status, body, headers=headers, head_only=head_only)

    def _base_url(self) -> str:
        """Public base URL as seen by the client (from ``Host``), used in returned URLs."""
        host = self.headers.get("Host", "")
        if host and _HOST_HEADER_RE.match(host):
            return f"http://{host}"
        return self.app.url

    # ---- auth --------------------------------------------------------------------------

    def _user(self) -> str | None:
        """Authenticated username, None when anonymous; 401 on a wrong token (if one is configured)."""
        header = self.headers.get("Authorization")
        expected = self.app.token
        if expected is None:
            return self.app.username if header else None
        if not header:
            return None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), expected.encode()):
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.app.username

    def _require_write(self) -> str:
        user = self._user()
        if self.app.token is not None and user is None:
            raise HubError(401, "You must be authenticated (Authorization: Bearer <token>) to perform this action")
        return user or self.app.username

    def _readable_repo(self, key: RepoKey) -> dict[str, Any]:
        """Repo metadata if the caller may read it; private repos need the token (if configured)."""
        user = self._user()
        meta = self.store.load_repo(key)
        if meta.get("private") and self.app.token is not None and user is None:
            raise HubError(401, "Repository not found", "RepoNotFound")
        return meta

    def _writable_repo(self, key: RepoKey) -> tuple[dict[str, Any], str]:
        user = self._require_write()
        return self.store.load_repo(key), user

    # ---- routing -----------------------------------------------------------------------

    def _route(self, method: str) -> None:
        split = urlsplit(self.path)
        raw = split.path.split("/")[1:]
        while raw and raw[-1] == "":
            raw.pop()
        segs = [unquote(s) for s in raw]
        query = parse_qs(split.query, keep_blank_values=True)

        if segs[:1] == ["api"]:
            self._route_api(method, segs[1:], query)
        elif segs[:2] == ["_lfs", "upload"] and len(segs) == 3 and method == "PUT":
            self._lfs_upload(segs[2], query)
        elif (lfs := self._match_lfs(segs)) is not None:
            key, action = lfs
            if method != "POST":
                raise HubError(405, "Method not allowed")
            if action == "batch":
                self._lfs_batch(key)
            else:
                self._lfs_verify(key)
        elif (res := self._match_resolve(segs)) is not None and method in ("GET", "HEAD"):
            key, revision, path = res
            self._resolve(key, revision, path, head_only=(method == "HEAD"))
        else:
            raise HubError(404, f"Not found: {method} {split.path}")

    def _key(self, repo_type: str, repo_id: str) -> RepoKey:
        return RepoKey.parse(repo_type, repo_id, self.app.username)

    def _match_lfs(self, segs: list[str]) -> tuple[RepoKey, str] | None:
        """``[datasets/]<ns>/<name>.git/info/lfs/objects/{batch,verify}``."""
        if len(segs) < 5 or segs[-4:-1] != ["info", "lfs", "objects"] or segs[-1] not in ("batch", "verify"):
            return None
        repo = segs[:-4]
        repo_type = "model"
        if len(repo) >= 2 and repo[0] in ("datasets", "spaces"):
            repo_type, repo = PLURAL_TO_TYPE[repo[0]], repo[1:]
        if not repo or not repo[-1].endswith(".git") or len(repo) > 2:
            return None
        repo[-1] = repo[-1][: -len(".git")]
        return self._key(repo_type, "/".join(repo)), segs[-1]

    def _match_resolve(self, segs: list[str]) -> tuple[RepoKey, str, str] | None:
        """``[datasets/|spaces/]<ns>/<name>/resolve/<rev>/<path...>`` (or ``<name>/resolve/...``)."""
        repo_type, rest = "model", segs
        if len(segs) >= 4 and segs[0] in ("datasets", "spaces") and "resolve" in segs[2:4]:
            repo_type, rest = PLURAL_TO_TYPE[segs[0]], segs[1:]
        if len(rest) >= 4 and rest[1] == "resolve":
            return self._key(repo_type, rest[0]), rest[2], "/".join(rest[3:])
        if len(rest) >= 5 and rest[2] == "resolve":
            return self._key(repo_type, f"{rest[0]}/{rest[1]}"), rest[3], "/".join(rest[4:])
        return None

    def _route_api(self, method: str, segs: list[str], query: dict[str, list[str]]) -> None:
        route = (method, tuple(segs))
        if route == ("GET", ("whoami-v2",)):
            return self._whoami()
        if route == ("GET", ("agent-harnesses",)):
            return self._send_json({"standardEnvVars": [], "harnesses": {}})
        if route == ("POST", ("validate-yaml",)):
            self._read_body()
            return self._send_json({"errors": [], "warnings": []})
        if route == ("POST", ("repos", "create")):
            return self._create_repo()
        if route == ("DELETE", ("repos", "delete")):
            return self._delete_repo()
        if not segs or segs[0] not in PLURAL_TO_TYPE:
            raise HubError(404, f"Not found: /api/{'/'.join(segs)}")
        repo_type = PLURAL_TO_TYPE[segs[0]]
        rest = segs[1:]
        if not rest:
            if method == "GET":
                return self._list_repos(repo_type, query)
            raise HubError(405, "Method not allowed")
        if len(rest) >= 2 and rest[1] not in _API_ACTIONS:
            repo_id, action = f"{rest[0]}/{rest[1]}", rest[2:]
        else:
            repo_id, action = rest[0], rest[1:]
        key = self._key(repo_type, repo_id)
        name = action[0] if action else ""
        args = action[1:]

        if method == "GET" and not action:
            return self._repo_info(key, None, query)
        if method == "GET" and name == "revision" and len(args) == 1:
            return self._repo_info(key, args[0], query)
        if method == "GET" and name == "tree" and args:
            return self._tree(key, args[0], "/".join(args[1:]), query)
        if method == "POST" and name == "paths-info" and len(args) == 1:
            return self._paths_info(key, args[0])
        if method == "GET" and name == "refs" and not args:
            return self._refs(key, query)
        if method == "GET" and name == "commits" and len(args) == 1:
            return self._commits(key, args[0], query)
        if method == "POST" and name == "preupload" and len(args) == 1:
            return self._preupload(key, args[0])
        if method == "POST" and name == "commit" and len(args) == 1:
            return self._commit(key, args[0], query)
        if name == "branch" and len(args) == 1 and method in ("POST", "DELETE"):
            return self._branch(key, args[0], method)
        if name == "tag" and len(args) == 1 and method in ("POST", "DELETE"):
            return self._tag(key, args[0], method)
        if method == "PUT" and name == "settings" and not args:
            return self._settings(key)
        raise HubError(404, f"Not found: {method} /api/{'/'.join(segs)}")

    # ---- account & repo management -----------------------------------------------------

    def _whoami(self) -> None:
        user = self._user()
        if user is None:
            raise HubError(401, "Authorization header is required (Bearer token)")
        self._send_json(
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": user,
                "email": None,
                "emailVerified": False,
                "canPay": False,
                "isPro": False,
                "periodEnd": None,
                "avatarUrl": "",
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "deltahub-local", "role": "write"}},
            }
        )

    def _repo_key_from_body(self, body: Mapping[str, Any]) -> RepoKey:
        name = body.get("name")
        organization = body.get("organization")
        if not isinstance(name, str) or not name:
            raise HubError(400, "Missing repo name")
        if "/" in name and not organization:
            organization, name = name.split("/", 1)
        repo_type = body.get("type") or "model"
        if not isinstance(repo_type, str) or repo_type not in TYPE_TO_PLURAL:
            raise HubError(400, f"Unsupported repo type: {repo_type!r}")
        repo_id = f"{organization}/{name}" if organization else name
        return self._key(repo_type, repo_id)

    def _create_repo(self) -> None:
        user = self._require_write()
        body = self._read_json()
        if not isinstance(body, dict):
            raise HubError(400, "Expected a JSON object")
        key = self._repo_key_from_body(body)
        visibility = body.get("visibility")
        private = bool(body.get("private")) or visibility == "private"
        url = f"{self._base_url()}/{key.url_prefix}{key.id}"
        extra = {"sdk": body["sdk"]} if key.type == "space" and body.get("sdk") else None
        try:
            self.store.create_repo(key, private=private, author=user, extra=extra)
        except HubError as e:
            if e.status == 409:  # create_repo(exist_ok=True) reads "url" from the 409 body
                e.extra["url"] = url
            raise
        self._send_json({"url": url, "name": key.id, "id": key.id})

    def _delete_repo(self) -> None:
        self._require_write()
        body = self._read_json()
        if not isinstance(body, dict):
            raise HubError(400, "Expected a JSON object")
        self.store.delete_repo(self._repo_key_from_body(body))
        self._send_json({})

    def _settings(self, key: RepoKey) -> None:
        self._writable_repo(key)
        body = self._read_json()
        if not isinstance(body, dict):
            raise HubError(400, "Expected a JSON object")
        changes: dict[str, Any] = {}
        if "private" in body:
            changes["private"] = bool(body["private"])
        if body.get("visibility") in ("private", "public"):
            changes["private"] = body["visibility"] == "private"
        if "gated" in body:
            changes["gated"] = body["gated"]
        meta = self.store.update_repo(key, **changes)
        self._send_json({"private": meta.get("private", False), "gated": meta.get("gated", False)})

    def _list_repos(self, repo_type: str, query: Mapping[str, list[str]]) -> None:
        user = self._user()
        author = (query.get("author") or [None])[0]
        search = (query.get("search") or [None])[0]
        items = []
        for key, meta in self.store.list_repos(repo_type):
            if meta.get("private") and self.app.token is not None and user is None:
                continue
            if author and key.namespace != author:
                continue
            if search and search.lower() not in key.id.lower():
                continue
            sha, commit = self.store.resolve(key, DEFAULT_BRANCH)
            items.append(self._info_json(key, meta, sha, commit, blobs=False, siblings=False))
        self._send_json(items)

    # ---- read endpoints ----------------------------------------------------------------

    def _info_json(
        self, key: RepoKey, meta: Mapping[str, Any], sha: str, commit: Commit, *, blobs: bool, siblings: bool = True
    ) -> dict[str, Any]:
        files: Mapping[str, FileEntry] = commit["files"]
        info: dict[str, Any] = {
            "_id": meta.get("_id"),
            "id": key.id,
            "author": key.namespace,
            "sha": sha,
            "lastModified": commit["date"],
            "createdAt": meta.get("createdAt"),
            "private": bool(meta.get("private")),
            "gated": meta.get("gated", False),
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "usedStorage": sum(e["size"] for e in files.values()),
        }
        if key.type == "model":
            info["modelId"] = key.id
        if key.type == "space":
            info["sdk"] = meta.get("sdk")
        if siblings:
            sib_list = []
            for path in sorted(files):
                entry = files[path]
                sib: dict[str, Any] = {"rfilename": path}
                if blobs:
                    sib["size"] = entry["size"]
                    sib["blobId"] = entry["git_sha1"]
                    if entry["lfs"]:
                        sib["lfs"] = {
                            "size": entry["size"],
                            "sha256": entry["oid_sha256"],
                            "pointerSize": len(lfs_pointer(entry["oid_sha256"], entry["size"])),
                        }
                sib_list.append(sib)
            info["siblings"] = sib_list
        return info

    def _repo_info(self, key: RepoKey, revision: str | None, query: Mapping[str, list[str]]) -> None:
        meta = self._readable_repo(key)
        sha, commit = self.store.resolve(key, revision or DEFAULT_BRANCH)
        blobs = _truthy(query.get("blobs"))
        self._send_json(self._info_json(key, meta, sha, commit, blobs=blobs))

    def _tree(self, key: RepoKey, revision: str, path: str, query: Mapping[str, list[str]]) -> None:
        self._readable_repo(key)
        sha, commit = self.store.resolve(key, revision)
        entries = _tree_json(commit["files"], path, recursive=_truthy(query.get("recursive")))
        if _truthy(query.get("expand")):
            self._add_last_commits(key, sha, commit, entries)
        self._send_json(entries)

    def _add_last_commits(self, key: RepoKey, sha: str, commit: Commit, entries: list[dict[str, Any]]) -> None:
        last = _last_commits(self.store.history(key, sha))
        for entry in entries:
            if entry["type"] == "file":
                c = last.get(entry["path"])
            else:  # newest commit touching anything below the folder
                prefix = entry["path"] + "/"
                candidates = [last[p] for p in commit["files"] if p.startswith(prefix) and p in last]
                c = max(candidates, key=lambda x: x["date"]) if candidates else None
            if c is not None:
                entry["lastCommit"] = {"id": c["id"], "title": c["title"], "date": c["date"]}

    def _paths_info(self, key: RepoKey, revision: str) -> None:
        self._readable_repo(key)
        raw = self._read_body()
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                raise HubError(400, "Malformed JSON body") from None
            paths = body.get("paths") or []
            expand = bool(body.get("expand"))
        else:
            form = parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True)
            paths = form.get("paths", [])
            expand = _truthy(form.get("expand"))
        if isinstance(paths, str):
            paths = [paths]
        sha, commit = self.store.resolve(key, revision)
        files: Mapping[str, FileEntry] = commit["files"]
        out: list[dict[str, Any]] = []
        for p in paths:
            p = str(p).strip("/")
            if p in files:
                out.append(_file_json(p, files[p]))
            elif p and any(f.startswith(p + "/") for f in files):
                out.append(_dir_json(files, p))
        if expand:
            self._add_last_commits(key, sha, commit, out)
        self._send_json(out)

    def _refs(self, key: RepoKey, query: Mapping[str, list[str]]) -> None:
        self._readable_repo(key)
        refs = self.store.load_refs(key)
        body: dict[str, Any] = {
            "branches": [
                {"name": n, "ref": f"refs/heads/{n}", "targetCommit": s} for n, s in sorted(refs["branches"].items())
            ],
            "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": s} for n, s in sorted(refs["tags"].items())],
            "converts": [],
        }
        if _truthy(query.get("include_prs")):
            body["pullRequests"] = [
                {"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": s}
                for n, s in sorted(refs["prs"].items(), key=lambda kv: int(kv[0]))
            ]
        self._send_json(body)

    def _commits(self, key: RepoKey, revision: str, query: Mapping[str, list[str]]) -> None:
        self._readable_repo(key)
        sha, _ = self.store.resolve(key, revision)
        formatted = "formatted" in (query.get("expand[]") or []) + (query.get("expand") or [])
        items = []
        for c in self.store.history(key, sha):
            item: dict[str, Any] = {
                "id": c["id"],
                "title": c["title"],
                "message": c["message"],
                "date": c["date"],
                "authors": [{"user": c["author"]}],
            }
            if formatted:
                item["formatted"] = {"title": html.escape(c["title"]), "message": html.escape(c["message"])}
            items.append(item)
        self._send_json(items)

    def _resolve(self, key: RepoKey, revision: str, path: str, *, head_only: bool) -> None:
        self._readable_repo(key)
        sha, commit = self.store.resolve(key, revision)
        entry: FileEntry | None = commit["files"].get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers={"X-Repo-Commit": sha})
        size = int(entry["size"])
        etag = entry["oid_sha256"] if entry["lfs"] else entry["git_sha1"]
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{etag}"',
            "Accept-Ranges": "bytes",
            "Cache-Control": "no-cache",
        }
        if entry["lfs"]:
            headers["X-Linked-Etag"] = f'"{entry["oid_sha256"]}"'
            headers["X-Linked-Size"] = str(size)
        ctype = mimetypes.guess_type(path)[0] or "application/octet-stream"

        start, end, status = 0, size - 1, 200
        range_header = self.headers.get("Range")
        if range_header:
            parsed = _parse_range(range_header, size)
            if parsed == "unsatisfiable":
                headers["Content-Range"] = f"bytes */{size}"
                raise HubError(416, f"Requested range not satisfiable: {range_header}", headers=headers)
            if parsed is not None:
                start, end = parsed
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(0, end - start + 1)

        self._responded = True
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(length))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if head_only or length == 0:
            return
        with open(self.store.blob_path(entry["oid_sha256"]), "rb") as f:
            f.seek(start)
            remaining = length
            while remaining:
                chunk = f.read(min(remaining, _COPY_CHUNK))
                if not chunk:
                    raise HubError(500, "Blob shorter than recorded size")
                self.wfile.write(chunk)
                remaining -= len(chunk)

    # ---- write endpoints ---------------------------------------------------------------

    def _preupload(self, key: RepoKey, revision: str) -> None:
        self._writable_repo(key)
        body = self._read_json()
        files_in = body.get("files") if isinstance(body, dict) else None
        if not isinstance(files_in, list):
            raise HubError(400, "Expected {'files': [...]}")
        sha, commit = self.store.resolve(key, revision)
        existing: Mapping[str, FileEntry] = commit["files"]
        out = []
        for item in files_in:
            if not isinstance(item, dict) or not isinstance(item.get("path"), str):
                raise HubError(400, "Each file needs a 'path'")
            path = validate_repo_path(item["path"])
            size = int(item.get("size") or 0)
            try:
                sample = base64.b64decode(item.get("sample") or "", validate=False)
            except (ValueError, TypeError):
                sample = b""
            mode = self._upload_mode(path, size, sample)
            remote = existing.get(path)
            remote_oid = None
            if remote is not None:
                remote_oid = remote["oid_sha256"] if remote["lfs"] else remote["git_sha1"]
            out.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": remote_oid})
        self._send_json({"files": out, "commitOid": sha})

    def _upload_mode(self, path: str, size: int, sample: bytes) -> str:
        """LFS for big files, LFS-pattern files (e.g. ``*.safetensors``) and binary samples."""
        if size == 0:
            return "regular"
        if size > self.app.lfs_threshold or is_lfs_path(path) or b"\x00" in sample:
            return "lfs"
        return "regular"

    def _commit(self, key: RepoKey, revision: str, query: Mapping[str, list[str]]) -> None:
        _, user = self._writable_repo(key)
        raw = self._read_body()
        header: dict[str, Any] | None = None
        operations: list[dict[str, Any]] = []
        for lineno, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                item_key, value = item["key"], item["value"]
            except (ValueError, KeyError, TypeError):
                raise HubError(400, f"Malformed NDJSON commit payload at line {lineno}") from None
            if not isinstance(value, dict):
                raise HubError(400, f"Malformed commit operation at line {lineno}")
            if item_key == "header":
                header = value
            elif item_key == "file":
                content = value.get("content", "")
                if value.get("encoding", "base64") == "base64":
                    try:
                        data = base64.b64decode(content, validate=True)
                    except (ValueError, TypeError):
                        raise HubError(400, f"Invalid base64 content for {value.get('path')!r}") from None
                else:
                    data = str(content).encode()
                operations.append({"op": "file", "path": value.get("path", ""), "content": data})
            elif item_key == "lfsFile":
                if value.get("algo", "sha256") != "sha256":
                    raise HubError(400, "Only sha256 LFS objects are supported")
                operations.append(
                    {
                        "op": "lfsFile",
                        "path": value.get("path", ""),
                        "oid": value.get("oid", ""),
                        "size": value.get("size"),
                    }
                )
            elif item_key in ("deletedFile", "deletedFolder"):
                operations.append({"op": item_key, "path": value.get("path", "")})
            else:
                raise HubError(400, f"Unsupported commit operation {item_key!r}")
        if header is None:
            raise HubError(400, "Commit payload has no header line")
        title = str(header.get("summary") or "").strip()
        if not title:
            raise HubError(400, "Commit summary must not be empty")
        create_pr = _truthy(query.get("create_pr"))
        sha, pr_num = self.store.commit(
            key,
            revision,
            title=title,
            message=str(header.get("description") or ""),
            operations=operations,
            author=user,
            parent_commit=header.get("parentCommit"),
            create_pr=create_pr,
        )
        repo_url = f"{self._base_url()}/{key.url_prefix}{key.id}"
        self._send_json(
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{repo_url}/commit/{sha}",
                "hookOutput": "",
                "pullRequestUrl": f"{repo_url}/discussions/{pr_num}" if pr_num is not None else None,
            }
        )

    def _branch(self, key: RepoKey, branch: str, method: str) -> None:
        _, user = self._writable_repo(key)
        if method == "DELETE":
            self.store.delete_branch(key, branch)
            return self._send_json({})
        body = self._read_json(required=False)
        starting_point = body.get("startingPoint") if isinstance(body, dict) else None
        self.store.create_branch(key, branch, starting_point, user)
        self._send_json({})

    def _tag(self, key: RepoKey, arg: str, method: str) -> None:
        self._writable_repo(key)
        if method == "DELETE":
            self.store.delete_tag(key, arg)
            return self._send_json({})
        body = self._read_json()
        tag = body.get("tag") if isinstance(body, dict) else None
        if not isinstance(tag, str):
            raise HubError(400, "Missing 'tag'")
        self.store.create_tag(key, tag, arg)
        self._send_json({})

    # ---- LFS ---------------------------------------------------------------------------

    def _lfs_batch(self, key: RepoKey) -> None:
        self._writable_repo(key)
        body = self._read_json()
        if not isinstance(body, dict) or not isinstance(body.get("objects"), list):
            raise HubError(400, "Expected an LFS batch request")
        if body.get("operation") != "upload":
            raise HubError(400, "Only the 'upload' LFS operation is supported; download via /resolve")
        base = self._base_url()
        lfs_ctype = "application/vnd.git-lfs+json"
        objects = []
        for obj in body["objects"]:
            oid = obj.get("oid") if isinstance(obj, dict) else None
            size = obj.get("size") if isinstance(obj, dict) else None
            if not isinstance(oid, str) or not _SHA256_RE.match(oid) or not isinstance(size, int) or size < 0:
                error = {"code": 422, "message": "Invalid oid or size"}
                objects.append({"oid": str(oid), "size": size if isinstance(size, int) else 0, "error": error})
                continue
            if size > self.app.max_upload_bytes:
                objects.append({"oid": oid, "size": size, "error": {"code": 422, "message": "Object too large"}})
                continue
            stored = self.store.blob_size(oid)
            if stored == size:
                objects.append({"oid": oid, "size": size})  # already present: no actions => client skips
                continue
            if stored is not None:
                objects.append({"oid": oid, "size": size, "error": {"code": 422, "message": "Size mismatch"}})
                continue
            exp = int(time.time()) + UPLOAD_URL_TTL_SECONDS
            sig = self.app._sign_upload(oid, size, exp)
            objects.append(
                {
                    "oid": oid,
                    "size": size,
                    "authenticated": True,
                    "actions": {
                        "upload": {
                            "href": f"{base}/_lfs/upload/{oid}?size={size}&exp={exp}&sig={sig}",
                            "expires_in": UPLOAD_URL_TTL_SECONDS,
                        },
                        "verify": {
                            "href": f"{base}/{key.url_prefix}{key.id}.git/info/lfs/objects/verify",
                            "expires_in": UPLOAD_URL_TTL_SECONDS,
                        },
                    },
                }
            )
        self._send_json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}, content_type=lfs_ctype)

    def _lfs_verify(self, key: RepoKey) -> None:
        self._writable_repo(key)
        body = self._read_json()
        oid = body.get("oid") if isinstance(body, dict) else None
        size = body.get("size") if isinstance(body, dict) else None
        if not isinstance(oid, str) or not _SHA256_RE.match(oid):
            raise HubError(400, "Invalid oid")
        stored = self.store.blob_size(oid)
        if stored is None or (size is not None and stored != size):
            raise HubError(404, f"LFS object {oid} not found (or wrong size)")
        self._send_json({"oid": oid, "size": stored})

    def _lfs_upload(self, oid: str, query: Mapping[str, list[str]]) -> None:
        """PUT target of the signed upload URL (the client sends no auth header here)."""
        try:
            size = int((query.get("size") or [""])[0])
            exp = int((query.get("exp") or [""])[0])
        except ValueError:
            raise HubError(403, "Invalid upload URL") from None
        sig = (query.get("sig") or [""])[0]
        if not _SHA256_RE.match(oid) or not hmac.compare_digest(sig, self.app._sign_upload(oid, size, exp)):
            raise HubError(403, "Invalid upload URL signature")
        if exp < time.time():
            raise HubError(403, "Upload URL expired")
        declared = self.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) != size:
            raise HubError(400, f"Content-Length {declared} does not match the object size {size}")
        if self.store.blob_size(oid) == size:
            for _ in self._iter_body(size):  # drain: content already stored
                pass
        else:
            self.store.put_blob_stream(self._iter_body(size), oid, size)
        self._send_json({})


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


# --------------------------------------------------------------------------------------------
# Public server object
# --------------------------------------------------------------------------------------------


class HubServer:
    """A local Hub-compatible server running in a background thread.

    Example::

        with HubServer(tmp_path) as hub:
            api = HfApi(endpoint=hub.url, token=False)
            api.create_repo("me/model")

    Args:
        root: storage directory (created if needed; reusing it keeps all repos).
        host: bind address; only loopback addresses unless ``allow_non_loopback``.
        port: TCP port, 0 picks a free one (see :attr:`port` / :attr:`url` after ``start``).
        token: if set, writes and private reads require ``Authorization: Bearer <token>``.
        username: the account name returned by ``whoami`` and used as default namespace.
        lfs_threshold: files larger than this many bytes are told to upload via LFS.
        max_body_bytes: limit for JSON / NDJSON request bodies.
        max_upload_bytes: limit for a single LFS object.
        request_timeout: socket timeout (seconds) of each connection.
        allow_non_loopback: permit binding to non-loopback addresses (never the default).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        *,
        username: str = DEFAULT_USERNAME,
        lfs_threshold: int = DEFAULT_LFS_THRESHOLD,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        allow_non_loopback: bool = False,
    ) -> None:
        if not allow_non_loopback and not is_loopback_host(host):
            raise ValueError(f"Refusing to bind to non-loopback host {host!r} (pass allow_non_loopback=True)")
        if not _NAME_RE.match(username):
            raise ValueError(f"Invalid username {username!r}")
        if token is not None and not token:
            raise ValueError("token must be a non-empty string or None")
        self.host = host.strip("[]")
        self.port = port
        self.token = token
        self.username = username
        self.lfs_threshold = lfs_threshold
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes
        self.request_timeout = request_timeout
        self.store = HubStore(root, username=username)
        self._secret = secrets.token_bytes(32)
        self._httpd: _HubHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def root(self) -> Path:
        return self.store.root

    @property
    def url(self) -> str:
        """Base URL to use as ``endpoint=`` / ``HF_ENDPOINT`` (valid once started)."""
        if self._httpd is None:
            raise RuntimeError("HubServer is not running; call start() first")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def start(self) -> HubServer:
        """Bind and serve in a daemon thread; returns ``self``."""
        if self._httpd is not None:
            return self
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        httpd = _HubHTTPServer((self.host, self.port), self, family)
        self.port = int(httpd.server_address[1])
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, name=f"hub-server-{self.port}", daemon=True
        )
        self._thread.start()
        logger.info("Hub server listening on %s (root=%s)", self.url, self.root)
        return self

    def stop(self) -> None:
        """Stop serving, cut open keep-alive connections and release the port."""
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        httpd.shutdown()
        httpd.close_connections()
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.url if self.running else "stopped"
        return f"HubServer({where}, root={str(self.root)!r}, auth={'on' if self.token else 'off'})"

    def _sign_upload(self, oid: str, size: int, exp: int) -> str:
        return hmac.new(self._secret, f"{oid}:{size}:{exp}".encode(), hashlib.sha256).hexdigest()


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m deltahub.testing.hub_server --root DIR [--host H] [--port N] [--token T]``."""
    parser = argparse.ArgumentParser(
        prog="python -m deltahub.testing.hub_server",
        description="Local Hugging Face Hub-compatible server (repos persist in --root). "
        "Point clients at it with HF_ENDPOINT=<url> and HF_HUB_DISABLE_XET=1.",
    )
    parser.add_argument("--root", required=True, help="storage directory (created if missing)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (loopback only by default)")
    parser.add_argument("--port", type=int, default=0, help="TCP port (0 = pick a free one)")
    parser.add_argument("--token", default=None, help="require this bearer token for writes / private reads")
    parser.add_argument("--username", default=DEFAULT_USERNAME, help="account name (whoami, default namespace)")
    parser.add_argument("--allow-non-loopback", action="store_true", help="allow binding a non-loopback address")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request (to stderr)")
    args = parser.parse_args(argv)

    if not args.allow_non_loopback and not is_loopback_host(args.host):
        print(
            f"error: refusing to bind non-loopback host {args.host!r}; pass --allow-non-loopback to override",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    if args.verbose:
        logger.setLevel(logging.DEBUG)
    server = HubServer(
        args.root,
        host=args.host,
        port=args.port,
        token=args.token,
        username=args.username,
        allow_non_loopback=args.allow_non_loopback,
    )
    try:
        server.start()
    except OSError as e:
        print(f"error: cannot bind {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    print(f"Hub server running at {server.url} (root={server.root}, auth={'token' if args.token else 'open'})")
    print(f"  export HF_ENDPOINT={server.url} HF_HUB_DISABLE_XET=1   # Ctrl-C to stop", flush=True)
    # Treat SIGTERM like Ctrl-C so the server shuts down cleanly (main thread only).
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt) if in_main_thread else None
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
