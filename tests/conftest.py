"""Shared fixtures: a real Kafka-protocol broker (Tansu) on a free loopback port, and daemon helpers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from streamkd.commands.broker import EmbeddedBroker, ensure_topics, free_port

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    """One embedded broker for the session (memory-only; each test uses its own topics)."""
    log_file = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_file=log_file) as b:
        yield b


@pytest.fixture
def topic(broker) -> str:
    """A fresh 3-partition topic (and its DLQ) per test."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    ensure_topics(broker.bootstrap, {name: 3, f"{name}.dlq": 1})
    return name


def produce_values(bootstrap: str, topic: str, values, *, partitions: int = 3, headers=None) -> dict[int, int]:
    """Send ``values`` round-robin over partitions; returns {partition: count}. Waits for every ack."""
    from kafka import KafkaProducer

    prod = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_request_size=64 << 20)
    counts: dict[int, int] = {}
    futs = []
    for i, v in enumerate(values):
        p = i % partitions
        h = headers(i) if callable(headers) else (headers or [])
        futs.append(prod.send(topic, value=v, partition=p, headers=h))
        counts[p] = counts.get(p, 0) + 1
    prod.flush()
    for f in futs:
        f.get(timeout=30)
    prod.close()
    return counts


def fmnist_pngs(n: int, split: str = "test", start: int = 0, labels: bool = False):
    """(values, headers_fn) for n Fashion-MNIST images as PNG records."""
    from streamkd.commands.datasets import load_fashion_mnist
    from streamkd.commands.produce import encode_image

    images, ys = load_fashion_mnist(split)
    values = [encode_image(images[start + i])[0] for i in range(n)]
    hdr = (lambda i: [("label", str(int(ys[start + i])).encode())]) if labels else None
    return values, hdr


def write_config(tmp_path: Path, bootstrap: str, topic: str, port: int, **sections) -> Path:
    cfg = {
        "kafka": {"bootstrap_servers": bootstrap, "topic": topic, "group_id": f"g-{topic}",
                  "dlq_topic": f"{topic}.dlq"},
        "train": {"batch_size": 32, "device": "cpu"},
        "input": {"max_wait_ms": 100},
        "checkpoint": {"dir": str(tmp_path / "ckpt"), "every_steps": 10, "every_seconds": 2},
        "snapshot": {"dir": str(tmp_path / "snap"), "every_steps": 20, "every_seconds": 5, "keep": 3},
        "metrics": {"host": "127.0.0.1", "port": port},
        "logging": {"progress_every_s": 1},
        # Exactly-once checks count every valid record as trained: no share of the stream goes to the
        # publishing gate's holdout (the gate is tested without a broker, in test_trainer.py).
        "gate": {"enabled": False},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class DaemonProc:
    """``streamkd run`` as a subprocess with its HTTP port, for black-box tests."""

    def __init__(self, config: Path, port: int, log_path: Path, env: dict | None = None):
        self.port = port
        self.log_path = log_path
        self.log = open(log_path, "ab")  # noqa: SIM115 - open for the daemon's life, closed by stop()/kill()
        self.proc = subprocess.Popen([sys.executable, "-m", "streamkd", "run", "-c", str(config)],
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO,
                                     env={**os.environ, **(env or {})})

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except OSError:
            return 0, b""

    def metric(self, name: str, labels: str = "") -> float | None:
        status, body = self.get("/metrics")
        if status != 200:
            return None
        key = f"{name}{{{labels}}}" if labels else name
        for line in body.decode().splitlines():
            if line.startswith(key + " "):
                return float(line.split()[-1])
        return None

    def wait_metric(self, name: str, target: float, timeout: float, labels: str = "") -> float:
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.tail()}")
            value = self.metric(name, labels)
            if value is not None and value >= target:
                return value
            time.sleep(0.25)
        raise AssertionError(f"{name} reached {value}, not {target}, within {timeout} s:\n{self.tail()}")

    def latest_manifest(self) -> dict:
        status, body = self.get("/v1/snapshots/latest")
        assert status == 200, (status, body)
        return json.loads(body)

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        finally:
            self.log.close()
        return rc

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.log.close()

    def tail(self, n: int = 40) -> str:
        if not self.log.closed:  # stop() closes it; the file on disk still has everything
            self.log.flush()
        return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-n:])


@pytest.fixture
def daemon_factory(tmp_path):
    procs: list[DaemonProc] = []

    def start(config: Path, port: int, env: dict | None = None) -> DaemonProc:
        d = DaemonProc(config, port, tmp_path / f"daemon-{len(procs)}.log", env)
        procs.append(d)
        return d

    yield start
    for d in procs:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


__all__ = ["produce_values", "fmnist_pngs", "write_config", "free_port", "DaemonProc", "REPO"]
