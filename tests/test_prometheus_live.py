"""Every Grafana panel query returns data from a real Prometheus scraping a running daemon.

A real Prometheus server (Debian package `prometheus`; missing -> the test fails, it never
skips) runs the deployed scrape config (deploy/prometheus/prometheus.yml: its `streamkd` job
pointed at the daemon, 1 s instead of 5 s) and the deployed alert rules. The daemon trains on
Fashion-MNIST PNG records from the real broker fixture, some with a `label` header (label
accuracy panel) and a few corrupt (rejection panels), checkpointing and publishing snapshots
every few steps. Each panel query from `dashboard_exprs()`, with the dashboard's variables set
to this daemon's instance and consumer group as Grafana would, is then sent to Prometheus's
HTTP API and must answer with at least one series holding a number: what Grafana would draw.

The `kafka-exporter` job scrapes `LagExporter`, a stand-in for kafka-exporter (a Go binary this
machine does not have): it serves kafka-exporter's `kafka_consumergroup_lag` series, computed
as kafka-exporter does (end offset - committed offset of the group, per partition), from the
real broker. The GPU memory panel is checked only where the daemon trains on CUDA.

Then the write-failure counters: the checkpoint and snapshot folders are replaced by plain
files for a while, and each failed background write must show in Prometheus. Finally the
daemon is restarted on its state: the checkpoint-age gauge must hold the newest checkpoint's
time from the first scrape on, not 0.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml
from conftest import fmnist_pngs, free_port, produce_values, write_config
from test_deploy import CUDA_GAUGES, PROMETHEUS_CONFIG, RULES, dashboard_exprs, metric_names

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

JOB = "streamkd"  # the job name the alert rules select on (up{job="streamkd"})
IMAGES = 600
CORRUPT = [b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, b"\xff\xd8\xff\xe0 truncated jpeg", b"definitely not an image"]
DEADLINE_S = 75  # from the daemon's start until every panel has data


def _get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


class Prometheus:
    """`prometheus` on a free loopback port with a temporary TSDB; `query()` over its HTTP API."""

    def __init__(self, binary: str, config: Path, workdir: Path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "prometheus.log"
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h",
             "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=workdir)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.base}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"prometheus not ready within {timeout} s:\n{self.tail()}")

    def query(self, expr: str) -> dict:
        """The API's whole answer ({"status", "data": {"resultType", "result"}} or an error)."""
        url = f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            return _get_json(url)
        except urllib.error.HTTPError as e:  # 400/422: bad expression, with a JSON error body
            return json.loads(e.read() or b"{}") or {"status": "error", "error": f"HTTP {e.code}"}

    def rules(self) -> list[dict]:
        body = _get_json(f"{self.base}/api/v1/rules")
        assert body["status"] == "success", body
        return [rule for group in body["data"]["groups"] for rule in group["rules"]]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def tail(self, n: int = 30) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def prometheus_config(metrics_port: int, exporter_port: int | None = None) -> dict:
    """The deployed prometheus.yml, scraping the daemon (and the lag exporter) every 1 s under
    the deployed job names, with the deployed rule files (absolute paths) evaluated every second."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_CONFIG.parent / glob) for glob in config["rule_files"]]
    targets = {JOB: metrics_port, "kafka-exporter": exporter_port}
    jobs = [j for j in config["scrape_configs"] if targets.get(j["job_name"])]
    for job in jobs:
        job["static_configs"] = [{"targets": [f"127.0.0.1:{targets[job['job_name']]}"]}]
    config["scrape_configs"] = jobs
    return config


class LagExporter:
    """kafka-exporter's `kafka_consumergroup_lag{consumergroup, topic, partition}` for one group
    and topic, computed from the broker at every scrape: end offset - committed offset, for the
    partitions the group has committed."""

    def __init__(self, bootstrap: str, group: str, topic: str):
        from kafka import KafkaConsumer

        self.group, self.topic = group, topic
        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server API)
                body = exporter.exposition().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", free_port()), Handler)  # one request at a time
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def exposition(self) -> str:
        from kafka import TopicPartition

        partitions = [TopicPartition(self.topic, p) for p in sorted(self.consumer.partitions_for_topic(self.topic))]
        committed = {tp: self.consumer.committed(tp) for tp in partitions}
        ends = self.consumer.end_offsets(partitions)  # after the commits: lag is never negative
        lines = ["# TYPE kafka_consumergroup_lag gauge"]
        for tp in partitions:
            if committed[tp] is not None:
                lines.append(f'kafka_consumergroup_lag{{consumergroup="{self.group}",partition="{tp.partition}",'
                             f'topic="{tp.topic}"}} {ends[tp] - committed[tp]}')
        return "\n".join(lines) + "\n"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.consumer.close()


@pytest.fixture
def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        pytest.fail("`prometheus` (the server) not found on PATH: apt-get install prometheus")
    return found


@pytest.fixture
def prometheus_factory(prometheus_binary, tmp_path):
    servers: list[Prometheus] = []

    def start(config: dict) -> Prometheus:
        workdir = tmp_path / f"prometheus-{len(servers)}"
        workdir.mkdir()
        path = workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        server = Prometheus(prometheus_binary, path, workdir)
        servers.append(server)
        server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()


def has_data(answer: dict) -> bool:
    """What Grafana draws: a successful query with at least one series holding a number."""
    if answer.get("status") != "success":
        return False
    data = answer["data"]
    if data["resultType"] == "scalar":
        return not math.isnan(float(data["result"][1]))
    return bool(data["result"]) and all(not math.isnan(float(s["value"][1])) for s in data["result"])


def scalar(prom: Prometheus, expr: str) -> float | None:
    answer = prom.query(expr)
    result = answer.get("data", {}).get("result") if answer.get("status") == "success" else None
    return float(result[0]["value"][1]) if result else None


def test_every_dashboard_panel_has_data_from_a_live_daemon(prometheus_factory, broker, topic, tmp_path,
                                                          daemon_factory):
    port = free_port()
    group = f"g-{topic}"  # write_config's group id
    exprs = dashboard_exprs(variables={"instance": f"127.0.0.1:{port}", "consumergroup": group})
    assert exprs, "the dashboard has no queries"
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}

    # The stream: PNGs, every other one labelled, with a few corrupt records among them.
    values, labelled = fmnist_pngs(IMAGES, labels=True)
    stream = values[:IMAGES // 2] + CORRUPT + values[IMAGES // 2:]
    headers = [labelled(i)[0] if i % 2 == 0 else None for i in range(IMAGES)]
    headers = headers[:IMAGES // 2] + [None] * len(CORRUPT) + headers[IMAGES // 2:]
    first = IMAGES // 2 + len(CORRUPT)

    def produce(lo: int, hi: int) -> None:
        produce_values(broker.bootstrap, topic, stream[lo:hi],
                       headers=lambda i: [headers[lo + i]] if headers[lo + i] else [])

    produce(0, first)
    exporter = LagExporter(broker.bootstrap, group, topic)
    prom = prometheus_factory(prometheus_config(port, exporter.port))
    config = write_config(tmp_path, broker.bootstrap, topic, port,
                          checkpoint={"every_steps": 4, "every_seconds": 2},
                          snapshot={"every_steps": 6, "every_seconds": 3, "keep": 2})
    daemon = daemon_factory(config, port)
    # The second half once Prometheus has seen training start: consumption then spans scrapes,
    # so the throughput panels show rates above zero, not just the first burst.
    deadline = time.monotonic() + DEADLINE_S
    while not scalar(prom, "streamkd_samples_trained_total"):
        if daemon.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no training seen by Prometheus:\n{daemon.tail()}\n{prom.tail(10)}")
        time.sleep(0.5)
    produce(first, len(stream))

    # Poll until Prometheus has scraped enough: every panel query answers with numbers (the
    # rate() panels need two scrapes of a moving counter inside their 1m window). The GPU panel
    # only where the daemon trains on CUDA; elsewhere it must answer, with no series.
    on_cuda = "cuda" in daemon.get("/metrics")[1].decode().split("streamkd_build_info{", 1)[1].split("}", 1)[0]
    expected = {e for _, e in exprs if on_cuda or not metric_names(e) <= CUDA_GAUGES}
    answers: dict[str, dict] = {}
    while True:
        if daemon.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {daemon.proc.returncode}:\n{daemon.tail()}")
        if prom.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {prom.proc.returncode}:\n{prom.tail()}")
        answers = {expr: prom.query(expr) for _, expr in exprs}
        trained = scalar(prom, "streamkd_samples_trained_total") or 0
        snapshot = scalar(prom, "streamkd_last_snapshot_version") or 0
        if all(map(has_data, (answers[e] for e in expected))) and trained >= IMAGES and snapshot >= 1:
            break
        if time.monotonic() > deadline:
            empty = [f"  {title}: {expr}\n    -> {json.dumps(answers[expr])[:300]}"
                     for title, expr in exprs if expr in expected and not has_data(answers[expr])]
            raise AssertionError(
                f"within {DEADLINE_S} s of the daemon's start ({trained:.0f} samples trained in "
                f"Prometheus, snapshot {snapshot:.0f}), {len(empty)} panel queries returned no data:\n"
                + "\n".join(empty) + f"\n--- daemon log:\n{daemon.tail(15)}\n--- prometheus log:\n{prom.tail(10)}")
        time.sleep(1.0)

    for title, expr in exprs:  # what the loop waited for, as the assertion of record
        answer = answers[expr]
        assert answer["status"] == "success", f"{title}: {expr}: {answer}"
        assert bool(answer["data"]["result"]) == (expr in expected), f"{title}: {expr}: {answer}"
    assert all(metric_names(e) <= CUDA_GAUGES for _, e in exprs if e not in expected)

    # The panels show this run's stream, not just any number.
    assert scalar(prom, f'up{{job="{JOB}"}}') == 1.0
    assert scalar(prom, "streamkd_ready") == 1.0
    assert scalar(prom, "streamkd_samples_trained_total") == IMAGES
    assert scalar(prom, 'sum(streamkd_messages_rejected_total)') == len(CORRUPT)
    assert scalar(prom, "sum(rate(streamkd_samples_trained_total[1m]))") > 0
    assert scalar(prom, "sum(rate(streamkd_messages_consumed_total[1m]))") > 0
    # The accuracy panel shows the daemon's own figure: once the stream is trained the gauge holds still,
    # and the next scrapes carry exactly the value /metrics serves (the labelled half of the stream makes
    # it a real prequential accuracy, with some correct predictions: above zero).
    own = daemon.metric("streamkd_label_accuracy_ratio")
    until = time.monotonic() + 10
    while (seen := scalar(prom, "streamkd_label_accuracy_ratio")) != own and time.monotonic() < until:
        time.sleep(0.5)
        own = daemon.metric("streamkd_label_accuracy_ratio")
    assert seen == own and own > 0.0, (seen, own)
    assert scalar(prom, "streamkd_checkpoints_written_total") >= 1
    # per instance: the daemon's own series carry its address, the broker-side lag its group
    instance = f"127.0.0.1:{port}"
    assert scalar(prom, f'process_resident_memory_bytes{{instance="{instance}"}}') > 50 << 20
    broker_lag = prom.query(f'kafka_consumergroup_lag{{consumergroup="{group}"}}')["data"]["result"]
    assert {s["metric"]["partition"] for s in broker_lag} == {"0", "1", "2"}
    assert all(s["metric"]["topic"] == topic and s["metric"]["job"] == "kafka-exporter" for s in broker_lag)

    # The deployed alert rules load and evaluate against live series without errors.
    deadline = time.monotonic() + 15
    while True:
        rules = prom.rules()
        if all(r["health"] != "unknown" for r in rules) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {r["name"] for r in rules if r["type"] == "alerting"} == alerts
    broken = {r["name"]: (r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"}
    assert not broken, f"rules not healthy: {broken}"
    for name in ("StreamkdDown", "StreamkdAbsent", "StreamkdCheckpointStale"):
        rule = next(r for r in rules if r["name"] == name)
        assert rule["state"] == "inactive", rule  # the daemon is up and checkpoints

    # Failed background writes: the folder replaced by a plain file for a while.
    ckpt_dir, snap_dir = tmp_path / "ckpt", tmp_path / "snap"

    def failing_writes(folder: Path, counter: str, more_records: bool) -> None:
        aside = folder.with_name(folder.name + ".aside")
        os.rename(folder, aside)
        folder.write_text("not a directory")
        try:
            if more_records:  # a snapshot is published only once the student has moved on
                produce_values(broker.bootstrap, topic, values[:64])
            deadline = time.monotonic() + 30
            while not scalar(prom, f'{counter}{{instance="{instance}"}}'):
                assert time.monotonic() < deadline, f"{counter} stayed 0:\n{daemon.tail(15)}"
                assert daemon.proc.poll() is None, daemon.tail()
                time.sleep(0.5)
        finally:
            folder.unlink()
            os.rename(aside, folder)

    failing_writes(ckpt_dir, "streamkd_checkpoint_write_failures_total", more_records=False)
    failing_writes(snap_dir, "streamkd_snapshot_write_failures_total", more_records=True)

    assert daemon.stop() == 0, daemon.tail()
    log = daemon.log_path.read_text(errors="replace")
    assert "checkpoint write failed" in log and "snapshot write failed" in log
    exporter.close()

    # Restart on the same state, with no checkpoint due for an hour: the checkpoint-age gauge
    # starts at the newest checkpoint's time.
    newest = max((p for p in ckpt_dir.iterdir() if p.name.startswith("step-")), key=lambda p: int(p.name[5:]))
    config = write_config(tmp_path, broker.bootstrap, topic, port,
                          checkpoint={"every_steps": 100_000, "every_seconds": 3600},
                          snapshot={"every_steps": 100_000, "every_seconds": 3600, "keep": 2})
    again = daemon_factory(config, port)
    restored = again.wait_metric("streamkd_last_checkpoint_timestamp_seconds", 1.0, timeout=DEADLINE_S)
    assert restored == newest.stat().st_mtime
    assert again.metric("streamkd_checkpoints_written_total") == 0
    assert again.stop() == 0, again.tail()
