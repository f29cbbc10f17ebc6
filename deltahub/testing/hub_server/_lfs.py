"""The legacy git-LFS upload flow: batch, signed object upload, verify (a handler mixin)."""

from __future__ import annotations

import hmac
import time
from collections.abc import Mapping

from ._common import _SHA256_RE, UPLOAD_URL_TTL_SECONDS, HubError, RepoKey


class _LfsRoutes:
    """``<repo>.git/info/lfs/objects/{batch,verify}`` and ``PUT /_lfs/upload/<oid>``."""

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

