"""`streamkd status URL` against the real HTTP server, the daemon's Metrics holder and a real SnapshotStore."""

from __future__ import annotations

import json
import threading
import time

import torch
from prometheus_client import CollectorRegistry

from streamkd import cli
from streamkd.commands.status import collect, parse_metrics, render
from streamkd.metrics import Metrics
from streamkd.serve.server import HttpServer
from streamkd.state.snapshot import SnapshotStore


def serve(tmp_path, *, publish: bool = True, extra=None, metrics: bool = True):
    registry = CollectorRegistry()
    metrics = Metrics(registry) if metrics else None
    store = SnapshotStore(tmp_path / "snap")
    if publish:
        assert metrics is not None
        m = store.publish({"w": torch.ones(3)}, {"step": 42, "metrics": {"agreement": 0.75, "kd_loss": 0.5}})
        metrics.snapshot_published(m["version"])
    if extra is not None:
        extra(registry)
    server = HttpServer("127.0.0.1", 0, registry, healthy=lambda: True, ready=lambda: True, snapshots=store)
    server.start()
    return server, metrics


def rows(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition("  ")
        out[key.strip()] = value.strip()
    return out


def test_one_screen_from_metrics_and_manifest(tmp_path, capsys) -> None:
    server, metrics = serve(tmp_path)
    try:
        metrics.gate_rejections.inc(2)
        metrics.drift_detected.inc(1)
        metrics.ready.set(1)
        metrics.trained(1000, steps=42)
        metrics.lag(0, 7)
        metrics.lag(1, 5)
        metrics.progress(0.4321, 0.8125, None)
        stop = threading.Event()

        def train():  # 100 samples every 50 ms while status measures: about 2,000 img/s
            while not stop.wait(0.05):
                metrics.trained(100)

        t = threading.Thread(target=train)
        t.start()
        try:
            assert cli.main(["status", f"http://127.0.0.1:{server.port}", "--interval", "1"]) == 0
        finally:
            stop.set()
            t.join()
        screen = rows(capsys.readouterr().out)
    finally:
        server.stop()
    assert screen["snapshot"] == "1"
    assert screen["snapshot age"].endswith(" s") and int(screen["snapshot age"].split()[0]) < 60
    assert screen["daemon"].endswith("ready")
    assert screen["step"] == "42"
    assert screen["lag"] == "12 records over 2 partition(s)"
    assert screen["agreement"] == "0.812  (snapshot: 0.750)"
    assert screen["kd loss"] == "0.4321"
    assert screen["gate"] == "2 rejections" and screen["drift"] == "1 detections"
    rate = float(screen["throughput"].split()[0].replace(",", ""))
    assert 800 < rate < 2600


def test_absent_figures_show_a_dash(tmp_path, capsys) -> None:
    """An endpoint without the daemon's metrics (another exporter, or an older daemon): a dash, never 0."""
    server, _ = serve(tmp_path, publish=False, metrics=False)
    try:
        assert cli.main(["status", f"127.0.0.1:{server.port}", "--interval", "0"]) == 0
        screen = rows(capsys.readouterr().out)
        assert cli.main(["status", f"127.0.0.1:{server.port}", "--interval", "0", "--json"]) == 0
        as_json = json.loads(capsys.readouterr().out)
    finally:
        server.stop()
    assert screen["snapshot"] == "- (no snapshot published yet)"
    for key in ("snapshot age", "throughput", "lag", "gate", "drift"):
        assert screen[key] == "-", key
    assert as_json["version"] is None and as_json["lag"] is None and as_json["gate_rejections"] is None


def test_unreachable_and_bad_url(capsys) -> None:
    assert cli.main(["status", "ftp://x"]) == 2
    assert cli.main(["status", "http://127.0.0.1:9", "--interval", "0", "--timeout", "1"]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_parse_and_render_units() -> None:
    samples = parse_metrics("# TYPE streamkd_rollbacks counter\nstreamkd_rollbacks_total 3.0\n")
    assert samples == {"streamkd_rollbacks_total": [({}, 3.0)]}
    s = {k: None for k in ("ready", "version", "snapshot_age_s", "snapshot_note", "step", "samples_trained",
                           "images_per_s", "lag", "lag_partitions", "agreement", "snapshot_agreement", "kd_loss",
                           "gate_rejections", "gate", "drift_detections", "drift", "rejected", "rollbacks",
                           "kafka_errors")}
    s.update(url="http://h:1", snapshot_age_s=7200.0, gate={"last": "rejected"}, rollbacks=3)
    screen = rows(render(s))
    assert screen["snapshot age"] == "2.0 h" and screen["gate"] == "last rejected" and screen["rollbacks"] == "3"


def test_collect_without_a_second_scrape(tmp_path) -> None:
    server, metrics = serve(tmp_path)
    try:
        metrics.trained(10)
        t = time.monotonic()
        s = collect(f"http://127.0.0.1:{server.port}", interval=0)
        assert time.monotonic() - t < 2
    finally:
        server.stop()
    assert s["images_per_s"] is None and s["samples_trained"] == 10 and s["version"] == 1
