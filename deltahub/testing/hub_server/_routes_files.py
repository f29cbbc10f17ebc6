"""File downloads (``/resolve`` with Range) and the write endpoints: preupload, commit, branch, tag (a handler mixin)."""

from __future__ import annotations

import base64
import json
import mimetypes
from collections.abc import Mapping
from typing import Any

from ._common import (
    _COPY_CHUNK,
    FileEntry,
    HubError,
    RepoKey,
    _parse_range,
    _truthy,
    is_lfs_path,
    validate_repo_path,
)


class _FileRoutes:
    """``<repo>/resolve/<rev>/<path>`` and ``/api/<type>s/<repo>/{preupload,commit,branch,tag}``."""

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
                self._write_body(chunk)
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

