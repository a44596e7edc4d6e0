"""Chaos benchmark: kill -9, a frozen broker and poison records against the real daemon, then an exact audit.

    nice python bench/chaos.py [--records 20000] [--kills 3] [--freezes 1] [--freeze-s 15] [--seed N]

Starts its own embedded broker, produces ``--records`` tiny npy images over 3
partitions with ``--poison`` of them invalid (every kind: random bytes, empty,
truncated npy, wrong dtype, wrong shape, bad label), and runs ``streamkd run``
as a subprocess under a supervisor that restarts it when it dies. At random
points of the stream it kill -9s the daemon ``--kills`` times and SIGSTOPs the
broker ``--freezes`` times for ``--freeze-s`` seconds. When every offset is
committed it stops the daemon with SIGTERM and audits. The last line of output
is one JSON object.

How each number is measured (all from artefacts outside the daemon's memory):

* ``records``: produced and acknowledged. ``valid``: records minus the poison
  ones, whose (partition, offset) the producer side knows.
* ``trained``: ``samples_seen`` of the final lineage (newest checkpoint, equal
  to the final snapshot manifest's). Every valid record is one 28×28 image, so
  one record trained = one sample.
* Exactly-once is checked at every *resume point*: each restarted daemon logs
  the checkpoint it resumed from (samples, offsets), and the final checkpoint
  is one more. A checkpoint's offsets say "every record below these is in the
  lineage"; so at each resume point ``samples`` must equal the number of
  valid records below its offsets. ``trained_twice`` is the largest excess
  of samples over that count seen at any resume point (or at the end), ``lost``
  the largest shortfall at any resume point, plus valid records never covered
  by the final offsets. A duplicate and a loss could only cancel if both fell
  between the same two resume points. ``resume_points`` says how many were
  checked.
* ``dlq_distinct``: distinct ``streamkd-source`` headers in the DLQ that name
  a poison record; ``dlq_unexpected``: any that name a valid record (must be
  0). ``dlq_total`` may exceed ``dlq_distinct``: after a kill, rejects between
  the last checkpoint and the kill are dead-lettered again (at-least-once).
* ``committed_ok``: the group's committed offsets equal the produced counts.
* ``max_recovery_s``: the longest time from a daemon (re)start or a broker thaw
  to the next trained sample (the daemon's ``streamkd_samples_trained_total``
  rising), polled every 0.1 s. ``cold_start_s`` is the same for the very
  first start (the same-run reference: a restart is a cold start plus
  recovery), and ``recovery_ratio`` = max_recovery_s / cold_start_s.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import yaml

from streamkd.commands.broker import EmbeddedBroker, ensure_topics, free_port

REPO = Path(__file__).resolve().parent.parent
PARTITIONS = 3


def npy(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, img)
    return buf.getvalue()


def make_records(n: int, poison_rate: float, rng: random.Random) -> tuple[list[tuple[bytes, list]], set[int]]:
    """(value, headers) per record and the indices of the poison ones."""
    bad = set(rng.sample(range(n), round(n * poison_rate)))
    kinds = [
        lambda i: (os.urandom(200), []),  # unknown_format
        lambda i: (b"", []),  # empty
        lambda i: (npy(np.zeros((28, 28), np.uint8))[:100], []),  # truncated -> corrupt
        lambda i: (npy(np.zeros((28, 28), np.float32)), []),  # bad_dtype
        lambda i: (npy(np.zeros((2, 5, 5, 7), np.uint8)), []),  # bad_shape
        lambda i: (npy(np.zeros((28, 28), np.uint8)), [("label", b"x")]),  # bad_label
    ]
    gen = np.random.default_rng(rng.randrange(1 << 30))
    out = []
    for i in range(n):
        if i in bad:
            out.append(kinds[i % len(kinds)](i))
        else:
            out.append((npy(gen.integers(0, 256, (28, 28), dtype=np.uint8)), []))
    return out, bad


def produce(bootstrap: str, topic: str, records: list[tuple[bytes, list]]) -> dict[int, int]:
    from kafka import KafkaProducer

    prod = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    futs = [prod.send(topic, value=v, headers=h, partition=i % PARTITIONS) for i, (v, h) in enumerate(records)]
    prod.flush()
    for f in futs:
        f.get(timeout=60)
    prod.close()
    counts: dict[int, int] = {}
    for i in range(len(records)):
        counts[i % PARTITIONS] = counts.get(i % PARTITIONS, 0) + 1
    return counts


class Daemon:
    def __init__(self, config: Path, port: int, log: Path):
        self.port, self.log = port, log
        self.started = time.monotonic()
        with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen([sys.executable, "-m", "streamkd", "run", "-c", str(config)], cwd=REPO,
                                         stdout=out, stderr=subprocess.STDOUT)

    def trained(self) -> float | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as r:
                body = r.read().decode()
        except OSError:
            return None
        m = re.search(r"^streamkd_samples_trained_total (\S+)$", body, re.MULTILINE)
        return float(m.group(1)) if m else None


def committed(bootstrap: str, topic: str, group: str) -> dict[int, int | None]:
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return {p: c.committed(TopicPartition(topic, p)) for p in range(PARTITIONS)}
    finally:
        c.close()


def read_dlq(bootstrap: str, topic: str) -> list[tuple[int, int]]:
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    tp = TopicPartition(topic, 0)
    c.assign([tp])
    c.seek_to_beginning(tp)
    end = c.end_offsets([tp])[tp]
    out = []
    deadline = time.monotonic() + 60
    while c.position(tp) < end and time.monotonic() < deadline:
        for recs in c.poll(timeout_ms=500).values():
            for r in recs:
                _, p, o = dict(r.headers)["streamkd-source"].decode().rsplit("/", 2)
                out.append((int(p), int(o)))
    c.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--poison", type=float, default=0.01)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--freezes", type=int, default=1)
    ap.add_argument("--freeze-s", type=float, default=15.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="train.device for the daemon (cpu, cuda, auto)")
    ap.add_argument("--workdir", default=None, help="keep logs and state here (default: a temp dir)")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="streamkd-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()

    broker = EmbeddedBroker(log_file=work / "broker.log").start()
    try:
        topic, group = "chaos", "g-chaos"
        ensure_topics(broker.bootstrap, {topic: PARTITIONS, f"{topic}.dlq": 1})
        records, bad = make_records(args.records, args.poison, rng)
        counts = produce(broker.bootstrap, topic, records)
        print(f"produced {args.records} records ({len(bad)} poison) in {time.monotonic() - t_start:.1f} s; "
              f"seed {seed}; work dir {work}", flush=True)
        port = free_port()
        config = work / "config.yaml"
        config.write_text(yaml.safe_dump({
            "kafka": {"bootstrap_servers": broker.bootstrap, "topic": topic, "group_id": group,
                      "dlq_topic": f"{topic}.dlq", "queue_records": 128, "max_poll_records": 100,
                      "max_partition_fetch_bytes": 32768},
            "train": {"batch_size": 32, "device": args.device},
            "input": {"max_wait_ms": 50},
            "checkpoint": {"dir": str(work / "ckpt"), "every_steps": 10, "every_seconds": 1, "keep": 3},
            "snapshot": {"dir": str(work / "snap"), "every_steps": 50, "every_seconds": 5, "keep": 3},
            "metrics": {"host": "127.0.0.1", "port": port},
            "logging": {"progress_every_s": 5},
        }))

        # Events at random points of the stream (fraction of records committed).
        events = sorted([(rng.uniform(0.1, 0.85), "kill") for _ in range(args.kills)]
                        + [(rng.uniform(0.1, 0.85), "freeze") for _ in range(args.freezes)])
        starts = 0
        d = Daemon(config, port, work / f"daemon-{starts}.log")
        recoveries: list[float] = []
        cold_start = None
        waiting_since: float | None = d.started  # a recovery being timed: since when
        waiting_base = 0.0
        kills = freezes = 0
        total = sum(counts.values())
        last_check = 0.0
        progress = 0.0
        while True:
            now = time.monotonic()
            if d.proc.poll() is not None:  # died by itself: restart it, like a Deployment would
                print(f"daemon exited with {d.proc.returncode}; restarting", flush=True)
                starts += 1
                d = Daemon(config, port, work / f"daemon-{starts}.log")
                waiting_since, waiting_base = d.started, 0.0
            if waiting_since is not None:
                value = d.trained()
                if value is not None and value > waiting_base:
                    took = time.monotonic() - waiting_since
                    if cold_start is None:
                        cold_start = took
                    else:
                        recoveries.append(took)
                    waiting_since = None
            if now - last_check > 0.5:
                last_check = now
                got = committed(broker.bootstrap, topic, group)
                progress = sum(v or 0 for v in got.values()) / total
                if got == counts:
                    break
            if events and progress >= events[0][0] and waiting_since is None:
                _, what = events.pop(0)
                time.sleep(rng.uniform(0, 1.0))  # not aligned with our own polling
                if what == "kill":
                    d.proc.kill()
                    d.proc.wait()
                    kills += 1
                    print(f"kill -9 at {progress:.0%} of the stream", flush=True)
                    starts += 1
                    d = Daemon(config, port, work / f"daemon-{starts}.log")
                    waiting_since, waiting_base = d.started, 0.0
                else:
                    broker.freeze()
                    print(f"broker frozen at {progress:.0%} for {args.freeze_s:.0f} s", flush=True)
                    time.sleep(args.freeze_s)
                    broker.thaw()
                    freezes += 1
                    waiting_since, waiting_base = time.monotonic(), d.trained() or 0.0
            if now - t_start > 1800:
                raise SystemExit("chaos run did not finish within 30 minutes")
            time.sleep(0.1)
        d.proc.send_signal(signal.SIGTERM)
        rc = d.proc.wait(120)

        # ---- the audit ----------------------------------------------------------------------
        bad_at = {(i % PARTITIONS, i // PARTITIONS) for i in bad}

        def valid_below(offsets: dict[int, int]) -> int:
            below = sum(offsets.values())
            return below - sum(1 for p, o in bad_at if o < offsets.get(p, 0))

        points: list[tuple[int, dict[int, int]]] = []
        pattern = re.compile(r"resumed from checkpoint step \d+ \((\d+) samples\); offsets (\{.*\})")
        for log in sorted(work.glob("daemon-*.log")):
            for m in pattern.finditer(log.read_text(errors="replace")):
                points.append((int(m.group(1)), {int(k): v for k, v in ast.literal_eval(m.group(2)).items()}))
        meta = json.loads(max((work / "ckpt").glob("step-*/meta.json")).read_text())
        final_offsets = {int(p): o for p, o in meta["offsets"][topic].items()}
        points.append((meta["samples_seen"], final_offsets))
        excess = max(0, *(s - valid_below(o) for s, o in points))
        shortfall = max(0, *(valid_below(o) - s for s, o in points))
        valid = args.records - len(bad)
        manifest = json.loads((work / "snap" / (work / "snap" / "LATEST").read_text().strip() / "manifest.json")
                              .read_text())
        dlq = read_dlq(broker.bootstrap, f"{topic}.dlq")
        result = {
            "records": args.records,
            "valid": valid,
            "trained": meta["samples_seen"],
            "lost": shortfall + (valid - valid_below(final_offsets)),
            "trained_twice": excess,
            "dlq_distinct": len(set(dlq) & bad_at),
            "dlq_unexpected": len(set(dlq) - bad_at),
            "dlq_total": len(dlq),
            "poison": len(bad),
            "kills": kills,
            "broker_freezes": freezes,
            "restarts": starts,
            "max_recovery_s": round(max(recoveries), 2) if recoveries else None,
            "cold_start_s": round(cold_start, 2) if cold_start else None,
            "recovery_ratio": round(max(recoveries) / cold_start, 2) if recoveries and cold_start else None,
            "resume_points": len(points),
            "manifest_samples_seen": manifest["samples_seen"],
            "committed_ok": committed(broker.bootstrap, topic, group) == counts,
            "final_exit_code": rc,
            "wall_s": round(time.monotonic() - t_start, 1),
            "seed": seed,
            "device": args.device,
        }
    finally:
        if broker.proc and broker.proc.poll() is None:
            broker.thaw()  # a frozen process ignores SIGTERM until it is thawed
        broker.stop()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
