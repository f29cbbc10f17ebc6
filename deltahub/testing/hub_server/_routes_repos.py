"""Account and repo management, repo info, tree, refs and commit-history endpoints (a handler mixin)."""

from __future__ import annotations

import hashlib
import html
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs

from ._common import (
    DEFAULT_BRANCH,
    TYPE_TO_PLURAL,
    Commit,
    FileEntry,
    HubError,
    RepoKey,
    _truthy,
    lfs_pointer,
)
from ._storage import _dir_json, _file_json, _last_commits, _tree_json


class _RepoRoutes:
    """``/api/whoami-v2``, ``/api/repos/*``, ``/api/<type>s/<repo>[/revision|tree|paths-info|refs|commits]``."""

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
        try:
            self.store.create_repo(key, private=private, author=user)
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

