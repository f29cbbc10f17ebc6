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
    repos/<models|datasets>/<ns>/<name>/
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

* With ``bandwidth`` (``--bandwidth MBPS``): response bodies are paced by one token bucket shared
  by all connections, like a single link of that many megabytes per second (see ``_bandwidth``).

Run standalone: ``python -m deltahub.testing.hub_server --root DIR [--port N] [--token T] [--bandwidth MBPS]``.

Test-only: nothing in the ``deltahub`` core imports this package. Layout:

* ``_common``        constants, :class:`HubError`, :class:`RepoKey`, path / ref validation, small helpers
* ``_storage``       :class:`HubStore` (blobs, repos, refs, commits) and the JSON views of trees
* ``_http``          the threading server and the request handler: plumbing and routing
* ``_auth``          bearer token, private-repo reads, write permission (handler mixin)
* ``_routes_repos``  whoami, repo create/delete/settings/list, info, tree, paths-info, refs, commits
* ``_routes_files``  ``/resolve`` downloads (Range), preupload, commit, branch, tag
* ``_lfs``           LFS batch, signed object upload, verify
* ``_bandwidth``     :class:`TokenBucket`, the optional shared bandwidth limit on response bodies
* ``_server``        :class:`HubServer` (background thread, context manager)
* ``_cli``           :func:`main`, behind ``python -m deltahub.testing.hub_server``
"""

from ._bandwidth import TokenBucket
from ._cli import main
from ._common import (
    DEFAULT_BRANCH,
    DEFAULT_LFS_THRESHOLD,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_USERNAME,
    HubError,
    RepoKey,
    git_blob_sha1,
    is_lfs_path,
    is_loopback_host,
    lfs_pointer,
    validate_repo_path,
)
from ._http import _HubHTTPServer, _HubRequestHandler
from ._server import HubServer
from ._storage import HubStore

__all__ = [
    "DEFAULT_BRANCH",
    "DEFAULT_LFS_THRESHOLD",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "DEFAULT_REQUEST_TIMEOUT",
    "DEFAULT_USERNAME",
    "HubError",
    "HubServer",
    "HubStore",
    "RepoKey",
    "TokenBucket",
    "_HubHTTPServer",
    "_HubRequestHandler",
    "git_blob_sha1",
    "is_lfs_path",
    "is_loopback_host",
    "lfs_pointer",
    "main",
    "validate_repo_path",
]
