"""The HTTP port, against a real SnapshotStore and a fresh registry, over real sockets."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry, Counter

from streamkd.serve.server import HttpServer
from streamkd.state.snapshot import SnapshotStore

TOKEN = "s3cret-token"


class Flags:
    healthy = True
    ready = False


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SnapshotStore:
    # Module-scoped (tests only read it): publishing and server start/stop dominate otherwise.
    s = SnapshotStore(tmp_path_factory.mktemp("snapshots"))
    s.publish({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}, {"step": 1})
    s.publish(
        {"w": torch.ones(1000, 300)},  # > 1 MiB: streamed in several chunks
        {"step": 2, "metrics": {"agreement": 0.9, "kd_loss": 0.1}},
        extra_files={"model.onnx": lambda p: p.write_bytes(b"onnx")},
    )
    return s


def make_server(store: SnapshotStore | None, token: str | None = None) -> tuple[HttpServer, Flags, Counter]:
    registry = CollectorRegistry()
    counter = Counter("streamkd_test_events", "Events for the test.", registry=registry)
    counter.inc(3)
    flags = Flags()
    server = HttpServer(
        "127.0.0.1", 0, registry,
        healthy=lambda: flags.healthy, ready=lambda: flags.ready, snapshots=store, token=token,
    )
    server.start()
    return server, flags, counter


@pytest.fixture(scope="module")
def module_server(store: SnapshotStore) -> Iterator[tuple[HttpServer, Flags]]:
    srv, flags, _ = make_server(store)
    yield srv, flags
    srv.stop()


@pytest.fixture
def server(module_server: tuple[HttpServer, Flags]) -> tuple[HttpServer, Flags]:
    srv, flags = module_server
    flags.healthy, flags.ready = True, False
    return srv, flags


def request(
    server: HttpServer, path: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """Raw http.client request: urllib would normalise '..' and refuse odd methods."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_metrics(server) -> None:
    srv, _ = server
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        assert "streamkd_test_events_total 3.0" in r.read().decode()
    status, headers, body = request(srv, "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200 and headers["content-type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def test_health_and_ready_flip(server) -> None:
    srv, flags = server
    assert request(srv, "/healthz")[0] == 200
    assert request(srv, "/readyz")[0] == 503
    flags.ready, flags.healthy = True, False
    assert request(srv, "/healthz")[0] == 503
    assert request(srv, "/readyz")[0] == 200


def test_latest_and_version_manifest(server, store: SnapshotStore) -> None:
    srv, _ = server
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/v1/snapshots/latest", timeout=10) as r:
        assert r.headers["Content-Type"] == "application/json"
        latest = json.load(r)
    assert latest == store.latest()
    assert latest["version"] == 2 and sorted(latest["files"]) == ["model.onnx", "model.safetensors"]
    status, _, body = request(srv, "/v1/snapshots/1")
    assert status == 200 and json.loads(body)["version"] == 1
    assert request(srv, "/v1/snapshots/3")[0] == 404


def test_file_download_etag_304_and_head(server, store: SnapshotStore) -> None:
    srv, _ = server
    on_disk = (store.directory / "2" / "model.safetensors").read_bytes()
    status, headers, body = request(srv, "/v1/snapshots/2/model.safetensors")
    assert status == 200 and body == on_disk
    assert headers["content-type"] == "application/octet-stream"
    assert headers["content-length"] == str(len(on_disk))
    etag = headers["etag"]
    assert etag == f'"{store.latest()["files"]["model.safetensors"]}"'

    assert request(srv, "/v1/snapshots/2/model.safetensors", headers={"If-None-Match": etag})[:3:2] == (304, b"")
    assert request(srv, "/v1/snapshots/2/model.safetensors", headers={"If-None-Match": '"other", ' + etag})[0] == 304
    assert request(srv, "/v1/snapshots/2/model.safetensors", headers={"If-None-Match": '"other"'})[0] == 200

    status, headers, body = request(srv, "/v1/snapshots/2/model.safetensors", method="HEAD")
    assert status == 200 and body == b"" and headers["content-length"] == str(len(on_disk))

    status, headers, body = request(srv, "/v1/snapshots/2/manifest.json")
    assert status == 200 and headers["content-type"] == "application/json"
    assert body == (store.directory / "2" / "manifest.json").read_bytes()
    assert request(srv, "/v1/snapshots/2/model.onnx")[2] == b"onnx"


@pytest.mark.parametrize(
    "path",
    [
        "/v1/snapshots/1/../../etc/passwd",
        "/v1/snapshots/1/%2e%2e/%2e%2e/etc/passwd",
        "/v1/snapshots/1/..%2F..%2FLATEST",
        "/v1/snapshots/..%2FLATEST",
        "/v1/snapshots/1//etc/passwd",
        "/v1/snapshots/1/%2Fetc%2Fpasswd",
        "/v1/snapshots/%31/model.safetensors%00",
        "/v1/snapshots/-1/model.safetensors",
        "/v1/snapshots/1/LATEST",
        "/v1/snapshots/1/unlisted.bin",
        "/v1/snapshots/1/model.safetensors/",
        "/v1/snapshots/",
        "/v1/snapshots",
        "/metrics/x",
        "/",
        "/etc/passwd",
    ],
)
def test_traversal_and_unknown_paths_404(server, store: SnapshotStore, path: str) -> None:
    (store.directory / "1" / "unlisted.bin").write_bytes(b"secret")
    srv, _ = server
    status, _, body = request(srv, path)
    assert status == 404, (path, body)
    assert b"root:" not in body and b"secret" not in body


def test_keep_alive_connection_serves_several_requests(server) -> None:
    srv, _ = server
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    try:
        steps = [("/healthz", 200, {}), ("/nope", 404, {}), ("/v1/snapshots/2/model.onnx", 200, {}),
                 ("/v1/snapshots/2/model.onnx", 304, {"If-None-Match": "*"}), ("/metrics", 200, {})]
        for path, code, headers in steps:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == code, path
    finally:
        conn.close()


def test_method_not_allowed(server) -> None:
    srv, _ = server
    for method in ("POST", "PUT", "DELETE", "PATCH", "BREW"):
        status, headers, _ = request(srv, "/v1/snapshots/latest", method=method)
        assert status == 405, method
        assert headers["allow"] == "GET, HEAD"


def test_token_required_for_snapshots_only(store: SnapshotStore, caplog: pytest.LogCaptureFixture) -> None:
    srv, _, _ = make_server(store, token=TOKEN)
    caplog.set_level(logging.DEBUG)
    try:
        for path in ("/v1/snapshots/latest", "/v1/snapshots/2/model.safetensors", "/v1/snapshots/9/nope"):
            assert request(srv, path)[0] == 401
            assert request(srv, path, headers={"Authorization": "Bearer wrong"})[0] == 401
            assert request(srv, path, headers={"Authorization": f"Basic {TOKEN}"})[0] == 401
        _, headers, _ = request(srv, "/v1/snapshots/latest")
        assert headers["www-authenticate"].startswith("Bearer")
        assert request(srv, "/v1/snapshots/latest", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
        assert request(srv, "/v1/snapshots/2/model.onnx", headers={"Authorization": f"bearer {TOKEN}"})[2] == b"onnx"
        for path in ("/metrics", "/healthz"):
            assert request(srv, path)[0] == 200
        assert TOKEN not in caplog.text
    finally:
        srv.stop()


def test_no_store_and_empty_store(tmp_path: Path) -> None:
    srv, _, _ = make_server(None)
    try:
        assert request(srv, "/v1/snapshots/latest")[0] == 404
    finally:
        srv.stop()
    srv, _, _ = make_server(SnapshotStore(tmp_path / "empty"))
    try:
        assert request(srv, "/v1/snapshots/latest")[0] == 404
    finally:
        srv.stop()


def test_handler_errors_become_500_and_server_survives(store: SnapshotStore, monkeypatch: pytest.MonkeyPatch) -> None:
    srv, _, _ = make_server(store)
    try:
        monkeypatch.setattr(store, "latest", lambda: 1 / 0)
        assert request(srv, "/v1/snapshots/latest")[0] == 500
        srv.healthy = lambda: 1 / 0  # a raising health check reads as unhealthy
        assert request(srv, "/healthz")[0] == 503
        assert request(srv, "/metrics")[0] == 200
    finally:
        srv.stop()


def test_stop_releases_port(store: SnapshotStore) -> None:
    srv, _, _ = make_server(store)
    port = srv.port
    assert port > 0
    srv.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)


def _serve(store: SnapshotStore | None, host: str = "127.0.0.1", **kwargs) -> HttpServer:
    server = HttpServer(host, 0, CollectorRegistry(), healthy=lambda: True, ready=lambda: True, snapshots=store,
                        **kwargs)
    server.start()
    return server


@pytest.mark.parametrize("host, token, snapshots, warned", [
    ("0.0.0.0", None, True, True),
    ("0.0.0.0", TOKEN, True, False),
    ("0.0.0.0", None, False, False),  # nothing to download there
    ("127.0.0.1", None, True, False),
    ("localhost", None, True, False),
])
def test_untokened_snapshots_on_a_reachable_address_warn_at_start(store, caplog, host, token, snapshots,
                                                                   warned) -> None:
    with caplog.at_level(logging.WARNING, logger="streamkd.serve.server"):
        srv = _serve(store if snapshots else None, host, token=token)
        srv.stop()
    hits = [r for r in caplog.records if r.levelno == logging.WARNING and "without a token" in r.getMessage()]
    assert bool(hits) == warned, [r.getMessage() for r in caplog.records]


def test_empty_token_is_refused_not_auth_off(store) -> None:
    for bad in ("", "  "):
        with pytest.raises(ValueError, match="token"):
            HttpServer("127.0.0.1", 0, CollectorRegistry(), healthy=lambda: True, ready=lambda: True,
                       snapshots=store, token=bad)


def test_connections_over_the_cap_get_503_and_slots_come_back(store) -> None:
    srv = _serve(store, max_connections=2)
    try:
        idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(2)]
        time.sleep(0.3)  # both accepted and holding a thread, waiting for a request line
        status, _, body = request(srv, "/healthz")
        assert (status, body) == (503, b"too many connections\n")
        for s in idle:
            s.close()
        deadline = time.monotonic() + 5
        while request(srv, "/healthz")[0] != 200:
            assert time.monotonic() < deadline, "slots were not released"
            time.sleep(0.05)
    finally:
        srv.stop()


def test_request_time_is_bounded_even_for_a_client_dripping_headers(store, caplog) -> None:
    srv = _serve(store, request_timeout_s=1.0)
    try:
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        closed = False
        caplog.set_level(logging.WARNING, logger="streamkd.serve.server")
        while time.monotonic() - t0 < 6:  # each byte comes well within the per-read timeout
            try:
                s.sendall(b"X-Slow: 1\r\n")
                s.settimeout(0.2)
                if s.recv(1024) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except OSError:  # reset: cut as well
                closed = True
                break
        elapsed = time.monotonic() - t0
        s.close()
        assert closed and elapsed < 3.0, elapsed
        while not any("request_timeout_s" in r.getMessage() for r in caplog.records):  # logged by the handler
            assert time.monotonic() - t0 < 8, "no warning about the cut connection"
            time.sleep(0.05)
        assert request(srv, "/healthz")[0] == 200  # the server itself is fine
    finally:
        srv.stop()


def test_force_publish_needs_the_token_and_calls_the_daemon(store: SnapshotStore) -> None:
    from streamkd.commands.force_publish import force_publish

    calls: list[int] = []
    server = HttpServer("127.0.0.1", 0, CollectorRegistry(), healthy=lambda: True, ready=lambda: True,
                        snapshots=store, token="s3cret", force_publish=lambda: calls.append(1))
    open_server = HttpServer("127.0.0.1", 0, CollectorRegistry(), healthy=lambda: True, ready=lambda: True,
                             snapshots=store, force_publish=lambda: calls.append(1))
    server.start()
    open_server.start()
    try:
        url = f"http://127.0.0.1:{server.port}"
        with pytest.raises(urllib.error.HTTPError) as e:
            force_publish(url, "wrong")
        assert e.value.code == 401 and calls == []
        assert "whatever the gate says" in force_publish(url, "s3cret")
        assert calls == [1]
        with pytest.raises(urllib.error.HTTPError) as e:  # no token configured: nobody may force a snapshot
            force_publish(f"http://127.0.0.1:{open_server.port}", "anything")
        assert e.value.code == 403 and calls == [1]
        req = urllib.request.Request(url + "/v1/snapshots/latest", data=b"", method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:  # POST anywhere else is still not allowed
            urllib.request.urlopen(req, timeout=5)
        assert e.value.code == 405
    finally:
        server.stop()
        open_server.stop()
