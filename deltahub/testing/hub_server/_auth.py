"""Bearer-token authentication and repo read/write permission checks (a handler mixin)."""

from __future__ import annotations

import hmac
from typing import Any

from ._common import HubError, RepoKey


class _AuthMixin:
    """Who is calling, and may they read / write this repo."""

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
