"""Reliability end to end, input side: poison records, a crashing decoder, bombs, NaN teachers, secrets.

Same harness as test_reliability_kafka.py (daemon subprocess, real broker,
numbers read from outside). Every invalid record must land in the DLQ exactly
(its ``streamkd-source`` header names it), every valid one must be trained.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port, produce_values, write_config
from PIL import Image
from test_reliability_kafka import (
    FAST,
    assert_exactly_once,
    dlq_sources,
    hooks_env,
    read_topic,
    snapshot_weights_finite,
    tiny_npy,
    wait_committed,
    where,
)
from torch import nn

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


# ------------------------------------------------------------------ poison records

def _npy_header(shape, descr: str = "|u1") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def poison_kinds() -> list[tuple[str, bytes, list, str]]:
    """(name, value, headers, expected streamkd-error) for every kind of bad record we know."""
    good_png = _png(np.full((28, 28), 90, np.uint8))
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return [
        ("random bytes", os.urandom(300), [], "unknown_format"),
        ("truncated png", good_png[: len(good_png) // 2], [], "corrupt"),
        ("empty", b"", [], "empty"),
        ("wrong magic (GIF)", b"GIF89a" + os.urandom(100), [], "unknown_format"),
        ("npy object dtype (pickle inside)", obj.getvalue(), [], "bad_dtype"),
        ("plain pickle", pickle.dumps({"x": list(range(10))}), [], "unknown_format"),
        ("npy wrong shape", _npy_header((2, 5, 5, 7)) + bytes(2 * 5 * 5 * 7), [], "bad_shape"),
        ("npy float32", _npy_header((28, 28), "<f4") + bytes(28 * 28 * 4), [], "bad_dtype"),
        ("npy short data", _npy_header((28, 28)) + bytes(100), [], "corrupt"),
        ("bad label", tiny_npy(1), [("label", b"-1")], "bad_label"),
        ("bad content-type", tiny_npy(2), [("content-type", b"text/html")], "unknown_format"),
    ]


def test_every_poison_record_is_dead_lettered_exactly_and_secrets_never_leak(broker, topic, tmp_path,
                                                                             daemon_factory):
    n = 2200
    kinds = poison_kinds()
    bad_at = {i: kinds[k % len(kinds)] for k, i in enumerate(range(50, n, 100))}  # 1 % (22), every kind twice
    values = [bad_at[i][1] if i in bad_at else tiny_npy(i) for i in range(n)]
    counts = produce_values(broker.bootstrap, topic, values, headers=lambda i: bad_at[i][2] if i in bad_at else [])
    password, token = "hunter2-sasl-7f3a9c", "tok-snapshot-51be0d"
    port = free_port()
    config = write_config(tmp_path, broker.bootstrap, topic, port, logging={"level": "DEBUG", "progress_every_s": 1},
                          **FAST)
    d = daemon_factory(config, port, env={"STREAMKD_KAFKA__SASL_PLAIN_PASSWORD": password,
                                          "STREAMKD_METRICS__SNAPSHOT_TOKEN": token})
    wait_committed(d, broker.bootstrap, topic, counts, timeout=90)

    rejected = {}
    for line in d.get("/metrics")[1].decode().splitlines():
        if line.startswith("streamkd_messages_rejected_total{"):
            rejected[line.split('"')[1]] = float(line.split()[-1])
    want = {}
    for _, _, _, reason in bad_at.values():
        want[reason] = want.get(reason, 0) + 1
    assert {r: v for r, v in rejected.items() if v} == want

    # Secrets: not in the log, the metrics, the manifest, the checkpoints or the DLQ.
    assert d.get("/v1/snapshots/latest")[0] == 401
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/snapshots/latest",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        manifest_body = r.read()
    metrics_body = d.get("/metrics")[1]
    assert d.stop() == 0, d.tail()
    assert_exactly_once(tmp_path, broker.bootstrap, topic, counts, trained=n - len(bad_at))

    dead = dlq_sources(broker.bootstrap, topic)
    assert sorted(dead) == sorted((where(i), kind[3]) for i, kind in bad_at.items())  # each one, once

    log = Path(d.log_path).read_bytes()
    assert b"DEBUG" in log  # the most talkative level was on
    on_disk = b"".join(p.read_bytes() for p in tmp_path.rglob("*.json"))
    dlq_bytes = b"".join((r.value or b"") + b"".join(v for _, v in r.headers)
                         for r in read_topic(broker.bootstrap, f"{topic}.dlq"))
    for secret in (password, token):
        for name, blob in (("log", log), ("metrics", metrics_body), ("manifest", manifest_body),
                           ("json files", on_disk), ("dlq", dlq_bytes)):
            assert secret.encode() not in blob, f"{secret} leaks into the {name}"


# ------------------------------------------------------------------ native decoder crash

def test_decoder_crash_is_quarantined_not_crash_looped(broker, topic, tmp_path, daemon_factory):
    """A record whose decoding aborts the process (like a libpng/libjpeg crash). Restarted like
    Kubernetes would: after 3 crashes with it in flight it is dead-lettered without decoding."""
    n, poison_at = 900, 400
    marker = b"\x89PNG\r\n\x1a\n" + b"CRASH!"
    values = [marker + os.urandom(64) if i == poison_at else tiny_npy(i) for i in range(n)]
    counts = produce_values(broker.bootstrap, topic, values)
    port = free_port()
    config = write_config(tmp_path, broker.bootstrap, topic, port, **FAST)
    env = hooks_env(tmp_path, STREAMKD_TEST_ABORT_ON=marker.hex())

    crashes = 0
    for _start in range(8):  # the supervisor (a Deployment's restart loop)
        d = daemon_factory(config, port, env=env)
        deadline = time.monotonic() + 60
        while d.proc.poll() is None and time.monotonic() < deadline:
            if d.metric("streamkd_messages_rejected_total", 'reason="decoder_crash"'):
                break
            time.sleep(0.25)
        if d.proc.poll() is None:
            break
        assert d.proc.returncode == -6, d.tail()  # SIGABRT, from the poison record
        crashes += 1
    else:
        pytest.fail(f"still crashing after {crashes} restarts")
    assert crashes == 3, crashes
    wait_committed(d, broker.bootstrap, topic, counts, timeout=60)
    assert d.stop() == 0, d.tail()
    assert_exactly_once(tmp_path, broker.bootstrap, topic, counts, trained=n - 1)
    assert dlq_sources(broker.bootstrap, topic) == [(where(poison_at), "decoder_crash")]
    log = "".join(p.read_text() for p in tmp_path.glob("daemon-*.log"))
    assert "died while decoding partition" in log and "decoder_crash" in log


# ------------------------------------------------------------------ a record that crashes the training step

@pytest.mark.parametrize("how, exit_code", [("raise", 1), ("abort", -6)])
def test_training_crash_is_dead_lettered_not_crash_looped(broker, topic, tmp_path, daemon_factory, how, exit_code):
    """A record that takes the process down inside the training step (an exception, or a signal), every time
    it is trained. Restarted like Kubernetes would: after 3 crashes in a row with it in the batch, the records
    of that batch go to the DLQ as train_crash and the daemon moves on; everything else is trained once."""
    n, poison_at, poison_value = 900, 400, 251
    values = [tiny_npy(i, poison_value) if i == poison_at else tiny_npy(i) for i in range(n)]
    counts = produce_values(broker.bootstrap, topic, values)
    port = free_port()
    config = write_config(tmp_path, broker.bootstrap, topic, port, **FAST)
    crash_on = f"{poison_value}:abort" if how == "abort" else str(poison_value)
    env = hooks_env(tmp_path, STREAMKD_TEST_STEP_CRASH_ON=crash_on)

    crashes = 0
    for _start in range(8):  # the supervisor (a Deployment's restart loop)
        d = daemon_factory(config, port, env=env)
        deadline = time.monotonic() + 60
        while d.proc.poll() is None and time.monotonic() < deadline:
            if d.metric("streamkd_messages_rejected_total", 'reason="train_crash"'):
                break
            time.sleep(0.25)
        if d.proc.poll() is None:
            break
        assert d.proc.returncode == exit_code, d.tail()
        crashes += 1
    else:
        pytest.fail(f"still crashing after {crashes} restarts")
    assert crashes == 3, crashes
    wait_committed(d, broker.bootstrap, topic, counts, timeout=60)
    assert d.stop() == 0, d.tail()
    dead = dlq_sources(broker.bootstrap, topic)
    assert where(poison_at) in {src for src, _ in dead}
    assert {reason for _, reason in dead} == {"train_crash"}
    assert 1 <= len(dead) <= FAST["train"]["batch_size"], dead  # at most the batch it crashed in
    assert_exactly_once(tmp_path, broker.bootstrap, topic, counts, trained=n - len(dead))
    log = "".join(p.read_text() for p in tmp_path.glob("daemon-*.log"))
    # An exception records itself as it happens; a signal is found at the next start.
    assert ("training raised with partition" if how == "raise" else "died while training partition") in log


def test_a_missing_teacher_file_stops_the_start_with_a_clear_error(tmp_path):
    """Not tied to data: no crash journal, no retry loop, exit 2 naming the file."""
    missing = tmp_path / "no-such-teacher.safetensors"
    r = subprocess.run([sys.executable, "-m", "streamkd", "run", "--set", f"teacher.weights={missing}",
                        "--set", f"checkpoint.dir={tmp_path}/ck", "--set", f"snapshot.dir={tmp_path}/sn"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert str(missing) in r.stderr
    assert not (tmp_path / "ck" / "train-journal.json").exists()


# ------------------------------------------------------------------ hostile sizes

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(side: int = 30000, mb: int = 64) -> bytes:
    """A real decompression bomb: a side×side gray PNG whose IDAT inflates to `mb` MB of rows (~64 KB on the wire)."""
    z = zlib.compressobj(9)
    row = b"\0" * (side + 1)  # filter byte + pixels
    body = b"".join(z.compress(row) for _ in range(mb * (1 << 20) // len(row))) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b""))


def jpeg_claiming(side: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16), 128, np.uint8)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, side, side)  # SOF0: length(2) precision(1) height(2) width(2)
    return bytes(data)


def webp_claiming(side: int) -> bytes:
    vp8x = b"\0" * 4 + (side - 1).to_bytes(3, "little") + (side - 1).to_bytes(3, "little")
    body = b"WEBP" + b"VP8X" + struct.pack("<I", len(vp8x)) + vp8x
    return b"RIFF" + struct.pack("<I", len(body)) + body


def npy_huge_header() -> bytes:
    """A v2 npy whose header length field says 1 MB (numpy's own limit is 10 KB)."""
    pad = b" " * (1 << 20)
    head = b"{'descr': '|u1', 'fortran_order': False, 'shape': (28, 28), }" + pad + b"\n"
    return b"\x93NUMPY\x02\x00" + struct.pack("<I", len(head)) + head + bytes(28 * 28)


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


# What a bare kafka-python consumer costs to receive one record at (partition, offset): its peak RSS
# growth in MB. Run in a fresh process, with the daemon's fetch settings.
_CLIENT_PEAK = """
import sys, time
from pathlib import Path
from kafka import KafkaConsumer, TopicPartition
def kb(f):
    return next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(f))
bootstrap, topic, p, off = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, max_poll_records=2000,
                  fetch_max_bytes=52428800, max_partition_fetch_bytes=10485760)
tp = TopicPartition(topic, p)
c.assign([tp]); c.seek(tp, max(0, off - 1)); c.poll(timeout_ms=1)
Path("/proc/self/clear_refs").write_text("5")
base = kb("VmRSS")
while c.position(tp) <= off:
    c.poll(timeout_ms=500)
print((kb("VmHWM") - base) / 1024)
"""


def test_bombs_and_oversize_records_rejected_before_decode_memory_bounded(broker, topic, tmp_path, daemon_factory):
    port = free_port()
    config = write_config(tmp_path, broker.bootstrap, topic, port, **FAST)
    d = daemon_factory(config, port)
    counts = produce_values(broker.bootstrap, topic, [tiny_npy(i) for i in range(600)])
    wait_committed(d, broker.bootstrap, topic, counts, timeout=60)  # warm: models, pools, buffers all allocated
    pid = d.proc.pid

    def produce_and_measure(values: list[bytes]) -> float:
        """Produce, wait until all is committed; the daemon's peak RSS growth meanwhile, in MB."""
        base = rss_kb(pid)
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
        more = produce_values(broker.bootstrap, topic, values)
        for p in counts:
            counts[p] += more[p]
        wait_committed(d, broker.bootstrap, topic, counts, timeout=90)
        return (rss_kb(pid, "VmHWM") - base) / 1024

    # 1. Decoder bombs: each would allocate hundreds of MB to GBs if decoded; all die at the header.
    bombs = [
        ("png 30000x30000 (real zlib bomb)", png_bomb(), "too_many_pixels"),
        ("jpeg SOF 30000x30000", jpeg_claiming(30000), "too_many_pixels"),
        ("webp canvas 16384x16384", webp_claiming(16384), "too_many_pixels"),
        ("npy header 30000x30000, no data", _npy_header((30000, 30000)), "too_many_pixels"),
        ("npy header 2^20 images", _npy_header((1 << 20, 28, 28, 1)), "too_many_images"),
        ("npy 1 MB header", npy_huge_header(), "corrupt"),
        ("9 MB record (> input.max_bytes)", b"\x89PNG\r\n\x1a\n" + os.urandom(9 << 20), "too_large"),
    ]
    at = dict(counts)
    growth = produce_and_measure([v for _, v, _ in bombs] + [tiny_npy(1000 + i) for i in range(300)])
    assert growth < 200, f"RSS grew by {growth:.0f} MB on decoder bombs"
    expected = [((i % 3, at[i % 3] + i // 3), reason) for i, (_, _, reason) in enumerate(bombs)]

    # 2. A 50 MB record. It is rejected by size before decode, but kafka-python alone needs
    # several copies of a fetch response to receive it: compare with a bare client, same run.
    p50, o50 = 0, counts[0]
    huge = b"\x89PNG\r\n\x1a\n" + os.urandom(50 << 20)
    growth50 = produce_and_measure([huge] + [tiny_npy(2000 + i) for i in range(300)])
    client = float(subprocess.run([sys.executable, "-c", _CLIENT_PEAK, broker.bootstrap, topic, str(p50), str(o50)],
                                  capture_output=True, text=True, timeout=60, check=True).stdout.split()[-1])
    assert growth50 < client + 100, f"daemon RSS grew by {growth50:.0f} MB, a bare kafka-python client by {client:.0f}"
    expected.append(((p50, o50), "too_large"))
    assert d.stop() == 0, d.tail()

    assert_exactly_once(tmp_path, broker.bootstrap, topic, counts, trained=1200)
    assert sorted(dlq_sources(broker.bootstrap, topic)) == sorted(expected)
    dead = read_topic(broker.bootstrap, f"{topic}.dlq")
    big = [r for r in dead if dict(r.headers)["streamkd-error"] == b"too_large"]
    assert sorted(len(r.value) for r in big) == [1_000_000, 1_000_000]  # cut to fit the DLQ
    assert all(dict(r.headers)["streamkd-truncated"] == b"1" for r in big)
    print(f"RSS growth: bombs {growth:.0f} MB; 50 MB record {growth50:.0f} MB (bare client {client:.0f} MB)")


# ------------------------------------------------------------------ non-finite numbers

class NanWhenBright(nn.Module):
    """A teacher whose logits are NaN for bright images (normalized mean above 1.5, i.e. raw ~> 240)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(28 * 28, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        logits = self.fc(flat)
        bright = flat.mean(1, keepdim=True) > 1.5
        return torch.where(bright, torch.full_like(logits, float("nan")), logits)


def test_nan_teacher_samples_are_skipped_and_counted(broker, topic, tmp_path, daemon_factory):
    teacher = tmp_path / "teacher.ts"
    torch.jit.save(torch.jit.script(NanWhenBright()), str(teacher))
    n = 1500
    bright = set(range(7, n, 100))  # 1 %
    values = [tiny_npy(i, value=255) if i in bright else tiny_npy(i) for i in range(n)]
    counts = produce_values(broker.bootstrap, topic, values)
    port = free_port()
    config = write_config(tmp_path, broker.bootstrap, topic, port, teacher={"model": str(teacher)}, **FAST)
    d = daemon_factory(config, port)
    wait_committed(d, broker.bootstrap, topic, counts, timeout=90)
    assert d.metric("streamkd_samples_skipped_total", 'reason="nonfinite_teacher"') == len(bright)
    assert d.metric("streamkd_rollbacks_total") == 0
    assert d.stop() == 0, d.tail()
    # Records with NaN teacher logits are consumed (offsets move on) but not trained.
    assert_exactly_once(tmp_path, broker.bootstrap, topic, counts, trained=n - len(bright))
    assert snapshot_weights_finite(tmp_path / "snap")


def test_lr_blowup_rolls_back_and_never_publishes_non_finite_weights(broker, topic, tmp_path, daemon_factory):
    """lr 1e40 with plain SGD: the first update makes the weights infinite through *finite*
    gradients (the step guard cannot see that), every later step is non-finite. AdamW with
    lr 1e6 would only make the loss non-finite: its update is bounded by lr."""
    n = 1200
    counts = produce_values(broker.bootstrap, topic, [tiny_npy(i) for i in range(n)])
    port = free_port()
    config = write_config(tmp_path, broker.bootstrap, topic, port,
                          **{**FAST, "train": {**FAST["train"], "optimizer": "sgd", "lr": 1e40, "momentum": 0.0,
                                               "grad_clip": 0.0, "max_consecutive_skips": 3},
                             # a snapshot after every step: each blown-up step is offered for publication
                             "snapshot": {"every_steps": 1, "every_seconds": 3, "keep": 3}})
    d = daemon_factory(config, port)
    wait_committed(d, broker.bootstrap, topic, counts, timeout=90)
    rollbacks = d.metric("streamkd_rollbacks_total")
    skipped = d.metric("streamkd_updates_skipped_total", 'reason="nonfinite_loss"')
    assert d.stop() == 0, d.tail()
    assert rollbacks >= 3 and skipped >= 3, (rollbacks, skipped)
    log = Path(d.log_path).read_text()
    assert "rolled back to checkpoint step" in log and "are not in the model" in log
    snapshot_weights_finite(tmp_path / "snap")
    for state in (tmp_path / "ckpt").glob("step-*/state.pt"):  # the rollback targets are finite too
        weights = torch.load(state, weights_only=True)["student"]
        assert all(torch.isfinite(t).all() for t in weights.values()), state
    assert "snapshot refused: refusing to publish non-finite weights" in log  # it did try
    meta = json.loads(max((tmp_path / "ckpt").glob("step-*/meta.json")).read_text())
    assert meta["offsets"][topic] == {str(p): c for p, c in counts.items()}  # consumed all, did not crash
