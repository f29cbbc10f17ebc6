"""The HTTP layer: the threading server and the request handler (plumbing and routing; endpoints live in mixins)."""

from __future__ import annotations

import json
import socket
import socketserver
import threading
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from ._auth import _AuthMixin
from ._common import (
    _API_ACTIONS,
    _COPY_CHUNK,
    _HOST_HEADER_RE,
    PLURAL_TO_TYPE,
    HubError,
    RepoKey,
    logger,
)
from ._lfs import _LfsRoutes
from ._routes_files import _FileRoutes
from ._routes_repos import _RepoRoutes
from ._storage import HubStore

if TYPE_CHECKING:
    from ._server import HubServer

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



class _HubRequestHandler(_AuthMixin, _RepoRoutes, _FileRoutes, _LfsRoutes, BaseHTTPRequestHandler):
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
            self._write_body(body)

    def _write_body(self, data: bytes) -> None:
        """Send response body bytes, through the server's bandwidth limit if it has one."""
        bucket = self.app.bandwidth_bucket
        if bucket is None:
            self.wfile.write(data)
            return
        view = memoryview(data)
        for start in range(0, len(view), bucket.piece):
            piece = view[start : start + bucket.piece]
            bucket.take(len(piece))
            self.wfile.write(piece)

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
        if len(repo) >= 2 and repo[0] == "datasets":
            repo_type, repo = PLURAL_TO_TYPE[repo[0]], repo[1:]
        if not repo or not repo[-1].endswith(".git") or len(repo) > 2:
            return None
        repo[-1] = repo[-1][: -len(".git")]
        return self._key(repo_type, "/".join(repo)), segs[-1]

    def _match_resolve(self, segs: list[str]) -> tuple[RepoKey, str, str] | None:
        """``[datasets/]<ns>/<name>/resolve/<rev>/<path...>`` (or ``<name>/resolve/...``)."""
        repo_type, rest = "model", segs
        if len(segs) >= 4 and segs[0] == "datasets" and "resolve" in segs[2:4]:
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

