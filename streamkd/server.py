"""The one HTTP port: /metrics, /healthz, /readyz and /v1/snapshots/...

Stdlib `ThreadingHTTPServer` plus prometheus_client's encoders; no framework.
Snapshot routes resolve files only through `SnapshotStore.file_path`, and a
version must be ASCII digits, so no request can name a path outside the
snapshot directory.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import json
import logging
import os
import re
import shutil
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from .snapshot import MANIFEST_FILE, SnapshotStore

__all__ = ["HttpServer"]

_DIGITS = re.compile(r"[0-9]{1,18}")
_CHUNK = 1 << 20


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client never blocks shutdown
    app: HttpServer


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive for scrapers; every response sets Content-Length
    server_version = "streamkd"
    sys_version = ""
    timeout = 30  # idle/slow clients release their thread (the stdlib bounds line and header sizes)

    def __getattr__(self, name: str):
        # BaseHTTPRequestHandler answers 501 for methods it has no do_X for; the
        # contract says 405 for anything that is not GET/HEAD.
        if name.startswith("do_"):
            return self._method_not_allowed
        raise AttributeError(name)

    def do_GET(self) -> None:
        self._handle(head=False)

    def do_HEAD(self) -> None:
        self._handle(head=True)

    def log_message(self, format: str, *args) -> None:
        # The request line carries no secrets (the token travels in a header).
        self.server.app.logger.debug("%s " + format, self.address_string(), *args)

    # ---- plumbing ------------------------------------------------------

    def _method_not_allowed(self) -> None:
        self._sent = False
        self.close_connection = True  # an unread request body must not be parsed as the next request
        self._text(405, "method not allowed\n", head=False, extra={"Allow": "GET, HEAD"})

    def _handle(self, head: bool) -> None:
        self._sent = False
        try:
            self._route(head)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:
            self.server.app.logger.exception("error serving %s", self.path)
            if self._sent:
                self.close_connection = True  # mid-body: the client sees a short read
            else:
                self._send_body(500, b"internal error\n", "text/plain; charset=utf-8", head)

    def _send_body(self, code: int, body: bytes, ctype: str, head: bool, extra: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self._sent = True
        if not head:
            self.wfile.write(body)

    def _text(self, code: int, text: str, head: bool, extra: dict[str, str] | None = None) -> None:
        self._send_body(code, text.encode(), "text/plain; charset=utf-8", head, extra)

    def _not_modified(self, etag: str) -> bool:
        """True (and a 304 sent) when If-None-Match matches `etag`."""
        inm = self.headers.get("If-None-Match")
        if not inm:
            return False
        tags = {t.strip().removeprefix("W/") for t in inm.split(",")}
        if "*" not in tags and etag not in tags:
            return False
        self.send_response(304)  # no body by definition, and no Content-Length (RFC 9110 15.4.5)
        self.send_header("ETag", etag)
        self.end_headers()
        self._sent = True
        return True

    def _json(self, obj: dict, head: bool, cache: str | None = None) -> None:
        body = json.dumps(obj, indent=2).encode() + b"\n"
        etag = f'"{hashlib.sha256(body).hexdigest()}"'
        if self._not_modified(etag):
            return
        extra = {"ETag": etag}
        if cache:
            extra["Cache-Control"] = cache
        self._send_body(200, body, "application/json", head, extra)

    # ---- routes --------------------------------------------------------

    def _route(self, head: bool) -> None:
        app = self.server.app
        path = urlsplit(self.path).path
        if path == "/metrics":
            return self._metrics(head)
        if path in ("/healthz", "/readyz"):
            check = app.healthy if path == "/healthz" else app.ready
            try:
                ok = bool(check())
            except Exception:
                app.logger.exception("%s check raised", path)
                ok = False
            return self._text(200 if ok else 503, "ok\n" if ok else "unavailable\n", head)
        if path == "/v1/snapshots" or path.startswith("/v1/snapshots/"):
            # Authenticate before anything else, so existence is not probeable without the token.
            if not app.authorized(self.headers.get("Authorization")):
                return self._text(401, "unauthorized\n", head, {"WWW-Authenticate": 'Bearer realm="streamkd"'})
            if app.snapshots is not None:
                # Decode each segment separately: an encoded '/' stays inside its segment and is rejected.
                parts = [unquote(p) for p in path[len("/v1/snapshots/"):].split("/")]
                return self._snapshots(app.snapshots, parts, head)
        self._text(404, "not found\n", head)

    def _metrics(self, head: bool) -> None:
        encoder, ctype = choose_encoder(self.headers.get("Accept"))
        body = encoder(self.server.app.registry)
        extra = {}
        if "gzip" in (self.headers.get("Accept-Encoding") or ""):
            body = gzip.compress(body, compresslevel=6)
            extra["Content-Encoding"] = "gzip"
        self._send_body(200, body, ctype, head, extra)

    def _snapshots(self, store: SnapshotStore, parts: list[str], head: bool) -> None:
        if parts == ["latest"]:
            m = store.latest()
            if m is None:
                return self._text(404, "no snapshot published yet\n", head)
            return self._json(m, head, cache="no-cache")
        if not parts or not _DIGITS.fullmatch(parts[0]) or len(parts) > 2:
            return self._text(404, "not found\n", head)
        version = int(parts[0])
        if len(parts) == 1:
            m = store.manifest(version)
            return self._json(m, head) if m is not None else self._text(404, "not found\n", head)
        self._file(store, version, parts[1], head)

    def _file(self, store: SnapshotStore, version: int, name: str, head: bool) -> None:
        path = store.file_path(version, name)
        manifest = store.manifest(version) if path is not None else None
        if path is None or manifest is None:
            return self._text(404, "not found\n", head)
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed by the `with f` below; the try covers only the open
        except FileNotFoundError:  # pruned between the lookup and the open
            return self._text(404, "not found\n", head)
        with f:
            if name == MANIFEST_FILE:
                sha = hashlib.sha256(f.read()).hexdigest()  # small; not listed in its own `files`
                f.seek(0)
            else:
                sha = manifest["files"][name]
            etag = f'"{sha}"'
            if self._not_modified(etag):
                return
            ctype = "application/json" if name.endswith(".json") else "application/octet-stream"
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(os.fstat(f.fileno()).st_size))
            self.send_header("ETag", etag)
            self.end_headers()
            self._sent = True
            if not head:
                shutil.copyfileobj(f, self.wfile, _CHUNK)  # streamed: constant memory for big models


class HttpServer:
    """Serves metrics, health and snapshots on one port from a daemon thread."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        *,
        healthy: Callable[[], bool],
        ready: Callable[[], bool],
        snapshots: SnapshotStore | None,
        token: str | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.host, self._port = host, port
        self.registry = registry
        self.healthy, self.ready = healthy, ready
        self.snapshots = snapshots
        self._token = token.encode() if token else None
        self.logger = logger or logging.getLogger(__name__)
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def authorized(self, header: str | None) -> bool:
        """True when no token is configured or `header` is 'Bearer <token>'."""
        if self._token is None:
            return True
        scheme, _, given = (header or "").partition(" ")
        # compare_digest: the time taken does not reveal how much of a guess matched.
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._token)

    def start(self) -> None:
        """Bind (port 0: any free port) and serve from a daemon thread; bind errors raise here."""
        if self._httpd is not None:
            raise RuntimeError("server already started")
        cls = _Server6 if ":" in self.host else _Server
        httpd = cls((self.host, self._port), _Handler)
        httpd.app = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="streamkd-http", daemon=True
        )
        self._thread.start()
        self.logger.info("serving http on %s:%d", self.host, self.port)

    @property
    def port(self) -> int:
        """The bound port (the configured one before start)."""
        return self._httpd.server_address[1] if self._httpd is not None else self._port

    def stop(self) -> None:
        """Stop accepting, close the socket and join the serving thread."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = self._thread = None
