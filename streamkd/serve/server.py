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
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from streamkd.state.layout import MANIFEST_FILE
from streamkd.state.snapshot import SnapshotStore

__all__ = ["HttpServer"]

_DIGITS = re.compile(r"[0-9]{1,18}")
_CHUNK = 1 << 20


_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
         b"Content-Length: 21\r\nRetry-After: 1\r\nConnection: close\r\n\r\ntoo many connections\n")


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client never blocks shutdown
    app: HttpServer

    def process_request(self, request, client_address) -> None:
        # Runs on the accepting thread: one thread per admitted connection, and no more than the cap.
        if not self.app._admit():
            try:
                request.settimeout(1.0)
                request.sendall(_BUSY)  # a fresh socket's send buffer is empty: this does not block
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # the thread did not start: give the slot back
            self.app._release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.app._release()


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive for scrapers; every response sets Content-Length
    server_version = "streamkd"
    sys_version = ""
    timeout = 30  # per socket read/write; the whole request is bounded by the app's request_timeout_s

    def setup(self) -> None:
        self.timeout = min(self.timeout, self.server.app.request_timeout_s)
        super().setup()

    def handle_one_request(self) -> None:
        # The deadline covers reading the request (a client dripping header bytes), handling it and
        # writing the response (a client that stops reading a download); the reaper cuts the socket.
        app = self.server.app
        app._deadlines.watch(self.connection, app.request_timeout_s)
        try:
            super().handle_one_request()
        finally:
            if app._deadlines.unwatch(self.connection):
                self.close_connection = True
                app.logger.warning("closed a connection from %s: request exceeded metrics.request_timeout_s "
                                   "(%.0f s)", self.address_string(), app.request_timeout_s)

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

    def do_POST(self) -> None:
        """``POST /v1/snapshots/publish``: publish a snapshot now, past the gate. Needs the snapshot token:
        without one configured, nobody may force a snapshot out."""
        self._sent = False
        self.close_connection = True  # any request body is left unread
        app = self.server.app
        if urlsplit(self.path).path != "/v1/snapshots/publish" or app.force_publish is None:
            return self._method_not_allowed()
        if app._token is None:
            return self._text(403, "forcing a snapshot needs metrics.snapshot_token to be set\n", head=False)
        if not app.authorized(self.headers.get("Authorization")):
            return self._text(401, "unauthorized\n", False, {"WWW-Authenticate": 'Bearer realm="streamkd"'})
        app.force_publish()
        app.logger.warning("an operator forced the next snapshot past the publishing gate")
        self._text(202, "a snapshot will be published at the next step, whatever the gate says\n", head=False)

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
        except OSError:
            if not self.server.app._deadlines.expired(self.connection):
                raise
            self.close_connection = True  # cut by the reaper mid-response
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


class _Deadlines:
    """Shuts down sockets whose request ran past its deadline, from one background thread."""

    def __init__(self) -> None:
        self._due: dict[socket.socket, float] = {}
        self._cut: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, sock: socket.socket, seconds: float) -> None:
        with self._lock:
            self._due[sock] = time.monotonic() + seconds
            self._cut.discard(sock)

    def unwatch(self, sock: socket.socket) -> bool:
        """Stop watching; True when the deadline had passed and the socket was cut."""
        with self._lock:
            self._due.pop(sock, None)
            cut = sock in self._cut
            self._cut.discard(sock)
            return cut

    def expired(self, sock: socket.socket) -> bool:
        with self._lock:
            return sock in self._cut

    def start(self, tick: float) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(tick,), name="streamkd-http-reaper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._thread = None

    def _run(self, tick: float) -> None:
        while not self._stop.wait(tick):
            now = time.monotonic()
            with self._lock:
                late = [s for s, due in self._due.items() if due <= now]
                for s in late:
                    del self._due[s]
                    self._cut.add(s)
            for s in late:
                try:
                    s.shutdown(socket.SHUT_RDWR)  # wakes the handler's blocked read or write with EOF / an error
                except OSError:
                    pass  # already closed by its handler


class HttpServer:
    """Serves metrics, health and snapshots on one port from a daemon thread.

    At most `max_connections` connections are served at once (more are answered
    503 and closed), and each request, from its first byte to its last response
    byte, must finish within `request_timeout_s` seconds or its connection is cut.
    """

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
        max_connections: int = 64,
        request_timeout_s: float = 300.0,
        force_publish: Callable[[], None] | None = None,
    ) -> None:
        if token is not None and not token.strip():
            raise ValueError("token must be None (no authentication) or a non-empty string")
        if max_connections < 1 or not request_timeout_s > 0:
            raise ValueError(f"max_connections must be >= 1 and request_timeout_s > 0, got {max_connections}, "
                             f"{request_timeout_s}")
        self.host, self._port = host, port
        self.registry = registry
        self.healthy, self.ready = healthy, ready
        self.snapshots = snapshots
        self.force_publish = force_publish  # POST /v1/snapshots/publish: the next snapshot skips the gate
        self._token = token.encode() if token is not None else None
        self.logger = logger or logging.getLogger(__name__)
        self.max_connections, self.request_timeout_s = max_connections, request_timeout_s
        self._active = 0
        self._active_lock = threading.Lock()
        self._last_busy_log = float("-inf")
        self._deadlines = _Deadlines()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def _admit(self) -> bool:
        with self._active_lock:
            if self._active < self.max_connections:
                self._active += 1
                return True
        now = time.monotonic()
        if now - self._last_busy_log >= 60:  # once a minute, not once per refused connection
            self._last_busy_log = now
            self.logger.warning("refusing HTTP connections: %d open, the limit (metrics.max_connections)",
                                self.max_connections)
        return False

    def _release(self) -> None:
        with self._active_lock:
            self._active -= 1

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
        self._deadlines.start(tick=min(1.0, self.request_timeout_s / 4))
        self.logger.info("serving http on %s:%d", self.host, self.port)
        bound = httpd.server_address[0]
        if self.snapshots is not None and self._token is None and not _is_loopback(bound):
            self.logger.warning(
                "snapshot files (the student's weights) are served without a token on %s (%s), reachable from "
                "other hosts: set metrics.snapshot_token, or bind metrics.host to 127.0.0.1", self.host, bound)

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
        self._deadlines.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = self._thread = None


def _is_loopback(address: str) -> bool:
    """True for a bound address only this host can reach (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False
