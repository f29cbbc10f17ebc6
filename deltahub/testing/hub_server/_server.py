"""The public :class:`HubServer` object: a local Hub-compatible server in a background thread."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socket
import threading
from pathlib import Path

from ._common import (
    _NAME_RE,
    DEFAULT_LFS_THRESHOLD,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_USERNAME,
    is_loopback_host,
    logger,
)
from ._bandwidth import TokenBucket
from ._http import _HubHTTPServer
from ._storage import HubStore


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
        bandwidth: if set, megabytes (10**6 bytes) per second that all response bodies together
            may use: one token bucket shared by every connection, like a real link of that speed.
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
        bandwidth: float | None = None,
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
        if bandwidth is not None and not (isinstance(bandwidth, (int, float)) and 0 < bandwidth < float("inf")):
            raise ValueError(f"bandwidth must be a positive number of MB/s or None, got {bandwidth!r}")
        self.bandwidth = bandwidth
        self.bandwidth_bucket = None if bandwidth is None else TokenBucket(bandwidth * 1e6)
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
        link = f", bandwidth={self.bandwidth:g} MB/s" if self.bandwidth is not None else ""
        return f"HubServer({where}, root={str(self.root)!r}, auth={'on' if self.token else 'off'}{link})"

    def _sign_upload(self, oid: str, size: int, exp: int) -> str:
        return hmac.new(self._secret, f"{oid}:{size}:{exp}".encode(), hashlib.sha256).hexdigest()

