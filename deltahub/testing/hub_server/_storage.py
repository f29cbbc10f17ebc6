"""On-disk storage: content-addressed blobs, repos, refs and commits, and the JSON views of trees."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ._common import (
    _PR_RE,
    _SHA1_RE,
    _SHA256_RE,
    _SHORT_SHA_RE,
    DEFAULT_BRANCH,
    DEFAULT_USERNAME,
    GITATTRIBUTES,
    TYPE_TO_PLURAL,
    Commit,
    FileEntry,
    HubError,
    RepoKey,
    _atomic_write_bytes,
    _atomic_write_json,
    _canonical_json,
    _now_iso,
    _read_json,
    _validate_ref_name,
    git_blob_sha1,
    lfs_pointer,
    validate_repo_path,
)


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

    def create_repo(self, key: RepoKey, *, private: bool, author: str) -> None:
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

