"""`streamkd pull` against a real HttpServer over a real SnapshotStore."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
from email.message import Message
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from streamkd import cli
from streamkd.serve import pull as pull_mod
from streamkd.serve.pull import (
    AuthError,
    PullError,
    TransientError,
    make_opener,
    pull_once,
    watch,
)
from streamkd.serve.server import HttpServer
from streamkd.state.layout import MODEL_FILE
from streamkd.state.snapshot import SnapshotStore

TOKEN = "s3cret-token-value"


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"fc.weight": torch.randn(64, 32, generator=g), "fc.bias": torch.randn(64, generator=g)}


def manifest(step: int) -> dict:
    return {"step": step, "samples_seen": 32 * step,
            "student": {"model": "streamkd:lenet5", "num_classes": 10, "input_shape": [1, 1, 28, 28],
                        "channels": 1, "input_size": [28, 28], "mean": [0.286], "std": [0.353]},
            "metrics": {"agreement": 0.5, "kd_loss": 1.0}}


def classes_writer(path: Path) -> None:
    path.write_text(json.dumps(["a", "b", "c"]))  # an extra file that never changes between versions


def publish(store: SnapshotStore, seed: int, step: int) -> dict:
    return store.publish(weights(seed), manifest(step), extra_files={"classes.json": classes_writer})


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Recorder:
    """An opener that records (path, status) of every request and passes it on."""

    def __init__(self) -> None:
        self.inner = make_opener("http://127.0.0.1")
        self.calls: list[tuple[str, int]] = []

    def open(self, req, data=None, timeout=None):
        path = req.full_url.split("/", 3)[3]
        try:
            resp = self.inner.open(req, timeout=timeout)
        except urllib.error.HTTPError as e:
            self.calls.append(("/" + path, e.code))
            raise
        self.calls.append(("/" + path, resp.status))
        return resp

    def take(self) -> list[tuple[str, int]]:
        calls, self.calls = self.calls, []
        return calls


def start_server(store: SnapshotStore, token: str | None = None) -> HttpServer:
    server = HttpServer("127.0.0.1", 0, CollectorRegistry(), healthy=lambda: True, ready=lambda: True,
                        snapshots=store, token=token)
    server.start()
    return server


@pytest.fixture
def daemon(tmp_path):
    store = SnapshotStore(tmp_path / "daemon", keep=5)
    server = start_server(store)
    yield store, f"http://127.0.0.1:{server.port}"
    server.stop()


def state(dest: Path) -> dict[str, bytes | list[str]]:
    """Everything a reader of DIR could see (names and bytes)."""
    out: dict[str, bytes | list[str]] = {}
    for root, dirs, files in os.walk(dest):
        rel = os.path.relpath(root, dest)
        out[rel] = sorted(dirs + files)
        for f in files:
            out[os.path.join(rel, f)] = Path(root, f).read_bytes()
    return out


def test_pull_mirrors_the_snapshot_then_does_nothing(daemon, tmp_path) -> None:
    store, url = daemon
    dest = tmp_path / "serving"
    assert pull_once(url, dest) is None  # nothing published yet
    m = publish(store, seed=1, step=10)
    rec = Recorder()
    assert pull_once(url, dest, opener=rec) == 1
    assert (dest / "LATEST").read_text() == "1\n"
    for name, digest in m["files"].items():
        assert sha(dest / "1" / name) == digest == sha(store.directory / "1" / name)
    assert json.loads((dest / "1" / "manifest.json").read_text()) == m
    assert sorted(p.name for p in dest.iterdir()) == [".etags.json", "1", "LATEST"]
    assert sorted(rec.take()) == sorted([("/v1/snapshots/latest", 200), ("/v1/snapshots/1/classes.json", 200),
                                          ("/v1/snapshots/1/model.safetensors", 200)])
    # The layout is the daemon's own: its reader accepts the copy.
    assert SnapshotStore(dest).latest() == m

    before = state(dest)
    assert pull_once(url, dest, opener=rec) == 1
    assert rec.take() == [("/v1/snapshots/latest", 304)]  # nothing else asked for, nothing re-downloaded
    assert state(dest) == before


def test_unchanged_files_are_not_downloaded_again(daemon, tmp_path) -> None:
    store, url = daemon
    dest = tmp_path / "serving"
    rec = Recorder()
    publish(store, seed=1, step=10)
    pull_once(url, dest, opener=rec)
    rec.take()

    m2 = publish(store, seed=1, step=20)  # same weights, new manifest
    assert pull_once(url, dest, opener=rec) == 2
    assert sorted(rec.take()) == sorted([("/v1/snapshots/latest", 200), ("/v1/snapshots/2/classes.json", 304),
                                          ("/v1/snapshots/2/model.safetensors", 304)])
    assert (dest / "LATEST").read_text() == "2\n"
    assert json.loads((dest / "2" / "manifest.json").read_text())["step"] == 20
    assert sha(dest / "2" / MODEL_FILE) == m2["files"][MODEL_FILE]
    assert os.path.samefile(dest / "1" / MODEL_FILE, dest / "2" / MODEL_FILE)  # linked, not copied

    m3 = publish(store, seed=2, step=30)  # new weights: downloaded; the unchanged extra file is not
    assert pull_once(url, dest, opener=rec, keep=2) == 3
    assert sorted(rec.take()) == sorted([("/v1/snapshots/latest", 200), ("/v1/snapshots/3/classes.json", 304),
                                          ("/v1/snapshots/3/model.safetensors", 200)])
    assert sha(dest / "3" / MODEL_FILE) == m3["files"][MODEL_FILE]
    assert sorted(p.name for p in dest.iterdir() if not p.name.startswith(".")) == ["2", "3", "LATEST"]


def test_tampered_file_is_refused_and_dir_unchanged(daemon, tmp_path, monkeypatch, capsys) -> None:
    store, url = daemon
    dest = tmp_path / "serving"
    publish(store, seed=1, step=10)
    pull_once(url, dest)
    before = state(dest)

    publish(store, seed=2, step=20)
    bad = tmp_path / "tampered.safetensors"
    data = bytearray((store.directory / "2" / MODEL_FILE).read_bytes())
    data[-1] ^= 0x01
    bad.write_bytes(bytes(data))
    real = store.file_path
    # The server resolves every file through file_path; serve wrong bytes under the right ETag.
    monkeypatch.setattr(store, "file_path", lambda v, n: bad if (v, n) == (2, MODEL_FILE) else real(v, n))

    with pytest.raises(PullError, match="model.safetensors: sha256 .* does not match"):
        pull_once(url, dest)
    assert state(dest) == before
    assert cli.main(["pull", url, str(dest)]) == 1
    assert "refusing snapshot 2" in capsys.readouterr().err
    assert state(dest) == before


def test_size_limit_and_interrupted_download_leave_nothing(daemon, tmp_path) -> None:
    store, url = daemon
    dest = tmp_path / "serving"
    publish(store, seed=1, step=10)
    with pytest.raises(PullError, match="exceeds the limit"):
        pull_once(url, dest, max_bytes=1000)
    assert os.listdir(dest) == []

    class DropsFiles(Recorder):
        def open(self, req, data=None, timeout=None):
            if "/latest" not in req.full_url:
                raise urllib.error.URLError(ConnectionResetError("reset by peer"))
            return super().open(req, data, timeout)

    with pytest.raises(TransientError, match="reset by peer"):
        pull_once(url, dest, opener=DropsFiles())
    assert os.listdir(dest) == []


def test_token_required(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.delenv(pull_mod.TOKEN_ENV, raising=False)
    store = SnapshotStore(tmp_path / "daemon")
    publish(store, seed=1, step=10)
    server = start_server(store, token=TOKEN)
    url = f"http://127.0.0.1:{server.port}"
    dest = tmp_path / "serving"
    try:
        with pytest.raises(AuthError, match="401"):
            pull_once(url, dest)
        assert cli.main(["pull", url, str(dest)]) == 2
        assert cli.main(["pull", url, str(dest), "--token", "wrong"]) == 2
        assert not (dest / "1").exists()
        assert cli.main(["pull", url, str(dest), "--token", TOKEN]) == 0
        assert (dest / "LATEST").read_text() == "1\n"
        monkeypatch.setenv(pull_mod.TOKEN_ENV, TOKEN)
        publish(store, seed=2, step=20)
        assert cli.main(["pull", url, str(dest)]) == 0
        assert (dest / "LATEST").read_text() == "2\n"
    finally:
        server.stop()
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err


def test_watch_follows_new_versions_and_retries(daemon, tmp_path) -> None:
    store, url = daemon
    dest = tmp_path / "serving"
    publish(store, seed=1, step=10)

    class FlakyThenFine(Recorder):
        failures = 2

        def open(self, req, data=None, timeout=None):
            if self.failures:
                self.failures -= 1
                raise urllib.error.URLError(ConnectionRefusedError("connection refused"))
            return super().open(req, data, timeout)

    stop = threading.Event()
    seen: list[int] = []
    t = threading.Thread(target=watch, args=(url, dest), daemon=True,
                         kwargs={"interval": 0.05, "keep": 2, "stop": stop, "opener": FlakyThenFine(),
                                 "min_backoff": 0.01, "on_version": seen.append})
    t.start()
    try:
        for target in (1, 2, 3):
            if target > 1:
                publish(store, seed=target, step=10 * target)
            deadline = time.monotonic() + 10
            while seen[-1:] != [target] and time.monotonic() < deadline:
                time.sleep(0.02)
            assert seen[-1:] == [target]
    finally:
        stop.set()
        t.join(timeout=5)
    assert not t.is_alive()
    assert seen == [1, 2, 3]
    assert sorted(p.name for p in dest.iterdir() if not p.name.startswith(".")) == ["2", "3", "LATEST"]


def test_watch_ctrl_c_exits_0(tmp_path, monkeypatch) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pull_mod, "watch", interrupted)
    assert cli.main(["pull", "http://127.0.0.1:9", str(tmp_path / "d"), "--watch", "--interval", "1"]) == 0


class _Canned:
    """A response object as urllib returns it, with a fixed body."""

    def __init__(self, body: bytes, etag: str | None = None) -> None:
        self._f = io.BytesIO(body)
        self.status = 200
        self.headers = Message()
        self.headers["Content-Length"] = str(len(body))
        if etag:
            self.headers["ETag"] = etag

    def read(self, n: int = -1) -> bytes:
        return self._f.read(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


@pytest.mark.parametrize("files", [
    {"../escape": "0" * 64, MODEL_FILE: "0" * 64},
    {".hidden": "0" * 64, MODEL_FILE: "0" * 64},
    {MODEL_FILE: "not-a-sha"},
    {"weights.bin": "0" * 64},
])
def test_malformed_manifest_is_refused(tmp_path, files) -> None:
    class Fake:
        def open(self, req, data=None, timeout=None):
            assert req.full_url.endswith("/v1/snapshots/latest"), "nothing but the manifest may be fetched"
            return _Canned(json.dumps({"version": 3, "files": files}).encode())

    with pytest.raises(PullError, match="manifest"):
        pull_once("http://daemon.invalid", tmp_path / "d", opener=Fake())
    assert os.listdir(tmp_path / "d") == []


def test_version_going_backwards_is_refused(daemon, tmp_path) -> None:
    store, url = daemon
    dest = tmp_path / "serving"
    publish(store, seed=1, step=10)
    pull_once(url, dest)
    # The daemon's snapshot folder was wiped: its numbering restarts, with different content.
    fresh = SnapshotStore(tmp_path / "fresh")
    publish(fresh, seed=9, step=1)
    server = start_server(fresh)
    try:
        with pytest.raises(PullError, match="differs"):
            pull_once(f"http://127.0.0.1:{server.port}", dest)
    finally:
        server.stop()
    assert (dest / "LATEST").read_text() == "1\n"


@pytest.mark.parametrize("model", ["/srv/models/evil.pt2", "evil.ts", "streamkd:x.pt", None])
def test_manifest_naming_a_model_file_is_refused(tmp_path, model) -> None:
    class Fake:
        def open(self, req, data=None, timeout=None):
            assert req.full_url.endswith("/v1/snapshots/latest"), "nothing but the manifest may be fetched"
            m = manifest(3) | {"version": 3, "files": {MODEL_FILE: "0" * 64}}
            m["student"]["model"] = model
            return _Canned(json.dumps(m).encode())

    with pytest.raises(PullError, match="student.model .* is refused"):
        pull_once("http://daemon.invalid", tmp_path / "d", opener=Fake())
    assert os.listdir(tmp_path / "d") == []


class _Streamed(_Canned):
    """A body of `n` bytes produced on demand, with no Content-Length (so only the running count can stop it)."""

    def __init__(self, n: int) -> None:
        super().__init__(b"")
        del self.headers["Content-Length"]
        self._left = n

    def read(self, n: int = -1) -> bytes:
        k = min(self._left, n if n > 0 else self._left)
        self._left -= k
        return b"[" * k


class _Broken(_Canned):
    def read(self, n: int = -1) -> bytes:
        raise ValueError("I/O operation on closed file")  # what a torn-down response can raise


def _bad_answers() -> list:
    ok = manifest(3) | {"version": 3}
    return [
        _Canned(b"[" * 100_000 + b"]" * 100_000),  # deeper than the JSON parser can recurse
        _Canned(b'{"version": 3, "files": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
        _Canned(b"[]"),
        _Canned(b"null"),
        _Canned(json.dumps({"version": "3", "files": {}}).encode()),
        _Canned(json.dumps({"version": 3, "files": [MODEL_FILE]}).encode()),
        _Canned(json.dumps({"version": 3, "files": {MODEL_FILE: 5}}).encode()),
        _Canned(json.dumps(ok | {"files": {MODEL_FILE: "0" * 64}, "student": "lenet"}).encode()),
        _Canned(json.dumps(ok | {"files": {f"f{i}": "0" * 64 for i in range(10_000)} | {MODEL_FILE: "0" * 64}
                                 }).encode()),
        _Canned(b"\xff\xfe\x00garbage"),
        _Streamed(64 << 20),  # a huge body: cut at the manifest limit
        _Broken(b""),
    ]


def test_watch_survives_any_malformed_answer(daemon, tmp_path) -> None:
    store, url = daemon
    publish(store, seed=1, step=10)
    bad = _bad_answers()

    class Hostile(Recorder):
        def open(self, req, data=None, timeout=None):
            if bad and req.full_url.endswith("/latest"):
                resp = bad.pop(0)
                resp.headers["ETag"] = '"x' + "\x7f" * 300 + '"'  # unusable ETags are not stored either
                return resp
            return super().open(req, data, timeout)

    stop = threading.Event()
    seen: list[int] = []
    t = threading.Thread(target=watch, args=(url, tmp_path / "serving"), daemon=True,
                         kwargs={"interval": 0.01, "keep": 2, "stop": stop, "opener": Hostile(),
                                 "min_backoff": 0.01, "max_backoff": 0.02,
                                 "on_version": lambda v: (seen.append(v), stop.set())})
    t.start()
    t.join(timeout=60)
    stop.set()
    assert not t.is_alive() and seen == [1], (seen, len(bad))
    assert bad == []  # every bad answer was met, and the watch went on to the good one
    assert (tmp_path / "serving" / "LATEST").read_text() == "1\n"


def test_a_dripping_server_cannot_outlast_the_deadline(tmp_path) -> None:
    import http.server

    body = b"x" * 40

    class Drip(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            if self.path.endswith("/latest"):
                m = manifest(1) | {"version": 1, "files": {MODEL_FILE: hashlib.sha256(body).hexdigest()}}
                raw = json.dumps(m).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                for b in body:  # each byte well within the per-read timeout; all of them far past the deadline
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
                    time.sleep(0.25)
            except OSError:  # the client gave up: that is the point
                pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        t0 = time.monotonic()
        with pytest.raises(TransientError, match="deadline"):
            pull_once(f"http://127.0.0.1:{srv.server_address[1]}", tmp_path / "d", timeout=5, deadline_s=1.0)
        assert time.monotonic() - t0 < 3.0
    finally:
        srv.shutdown()
        srv.server_close()
    assert [n for n in os.listdir(tmp_path / "d") if not n.startswith(".")] == []


# Runs `python -m streamkd ARGS...` where torch, torchvision and numpy cannot be imported, as on a serving host
# that has only the standard library and streamkd.
_NO_TORCH = r"""
import importlib.abc, runpy, sys

HEAVY = ("torch", "torchvision", "numpy")
assert not [m for m in sys.modules if m.split(".")[0] in HEAVY], "imported before the blocker"


class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            raise ImportError(f"No module named {name!r} (blocked)")
        return None


sys.meta_path.insert(0, Blocker())
for name in HEAVY:
    try:
        __import__(name)
    except ImportError:
        continue
    raise SystemExit(f"the blocker failed: {name} imported")
sys.argv = ["streamkd", *sys.argv[1:]]
try:
    runpy.run_module("streamkd", run_name="__main__", alter_sys=True)
finally:
    assert not [m for m in sys.modules if m.split(".")[0] in HEAVY]
"""


def _pull_without_torch(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop(pull_mod.TOKEN_ENV, None)
    return subprocess.run([sys.executable, "-c", _NO_TORCH, "pull", *args], capture_output=True, text=True,
                          env=env, timeout=120, check=False)


def test_pull_command_runs_without_torch(daemon, tmp_path) -> None:
    store, url = daemon
    dest = tmp_path / "serving"
    m1 = publish(store, seed=1, step=10)
    done = _pull_without_torch(url, str(dest))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(dest / "1")
    for name, digest in m1["files"].items():
        assert sha(dest / "1" / name) == digest
    assert json.loads((dest / "1" / "manifest.json").read_text()) == m1

    m2 = publish(store, seed=2, step=20)
    done = _pull_without_torch(url, str(dest), "--keep", "1")
    assert done.returncode == 0, done.stderr
    assert (dest / "LATEST").read_text() == "2\n"
    assert sorted(n for n in os.listdir(dest) if not n.startswith(".")) == ["2", "LATEST"]  # 1 pruned
    for name, digest in m2["files"].items():
        assert sha(dest / "2" / name) == digest
    assert SnapshotStore(dest).latest() == m2  # the daemon's own reader accepts the copy


def test_the_torch_blocker_blocks(tmp_path) -> None:
    # The harness above proves something only if the blocked modules really fail to import in it.
    prelude = _NO_TORCH.replace("runpy.run_module", "import torch; runpy.run_module")
    done = subprocess.run([sys.executable, "-c", prelude, "--version"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode != 0 and "(blocked)" in done.stderr
