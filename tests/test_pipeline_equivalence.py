"""The pipelined daemon (consumer thread -> decode pool -> prefetch queue -> step) against a straight loop.

Same records, same order, same batches: the daemon must consume the same set, take the same number
of steps, and end with the same student weights as a plain loop over decoded tensors.
"""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import fmnist_pngs

from streamkd import daemon
from streamkd.commands.broker import ensure_topics
from streamkd.config import load_config
from streamkd.ingest.decode import Decoded, Limits, decode_record

pytestmark = [pytest.mark.kafka]

# The straight loop below is the plain online KD step: no replay, EMA, holdout or drift reaction.
PLAIN = ["replay.enabled=false", "ema.enabled=false", "gate.enabled=false", "drift.enabled=false"]


@pytest.mark.parametrize("batch, workers", [(16, 1), (32, 3)])
def test_daemon_matches_straight_loop(broker, tmp_path, batch, workers):
    topic = f"equiv-{batch}-{workers}"
    ensure_topics(broker.bootstrap, {topic: 1})
    n = 8 * batch
    values, _ = fmnist_pngs(n, split="train")
    from conftest import produce_values

    produce_values(broker.bootstrap, topic, values, partitions=1)
    overrides = [f"kafka.bootstrap_servers={broker.bootstrap}", f"kafka.topic={topic}", "metrics.port=0",
                 f"checkpoint.dir={tmp_path}/ck", f"snapshot.dir={tmp_path}/sn", "train.device=cpu",
                 f"train.batch_size={batch}", "input.max_wait_ms=60000", f"input.decode_workers={workers}",
                 "kafka.max_poll_records=7",  # small polls: batches must not depend on poll boundaries
                 *PLAIN]
    cfg = load_config(None, overrides, env={})
    parts = daemon.build(cfg)
    prog = daemon.run(parts, threading.Event(), stop_when=lambda p: p.records_done >= n)
    assert prog.records_done == n and prog.samples_seen == n
    assert prog.step == n // batch
    assert prog.offsets == {0: n}

    # The straight loop: decode each record in order, fixed batches, the same Teacher and Learner code.
    ref = daemon.build(cfg)  # same seed -> same initial student
    limits = Limits()
    images = []
    for v in values:
        d = decode_record(v, None, limits)
        assert isinstance(d, Decoded)
        images.append(d.images)
    x_all = torch.cat(images)
    for i in range(0, n, batch):
        x = x_all[i:i + batch]
        ref.learner.step(x, ref.teacher(x), torch.full((batch,), -1))
    got = parts.learner.student.state_dict()
    want = ref.learner.student.state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


def test_compiled_daemon_warms_up_before_reading_and_matches_the_straight_loop(broker, tmp_path, monkeypatch):
    """train.compile: compilation happens before the first record (alive, not ready, nothing consumed),
    and the compiled, warmed-up daemon ends with the same weights as an eager straight loop."""
    import json
    import socket
    import urllib.error
    import urllib.request

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend="aot_eager"))  # no C++
    topic, batch, n = "equiv-compiled", 16, 64
    ensure_topics(broker.bootstrap, {topic: 1})
    values, _ = fmnist_pngs(n, split="train")
    from conftest import produce_values

    produce_values(broker.bootstrap, topic, values, partitions=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = [f"kafka.bootstrap_servers={broker.bootstrap}", f"kafka.topic={topic}", f"metrics.port={port}",
                 "metrics.host=127.0.0.1", f"checkpoint.dir={tmp_path}/ck", f"snapshot.dir={tmp_path}/sn",
                 "train.device=cpu", f"train.batch_size={batch}", "input.max_wait_ms=60000", *PLAIN,
                 "train.compile=true"]
    cfg = load_config(None, overrides, env={})
    parts = daemon.build(cfg)

    def status(path: str) -> int:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).status
        except urllib.error.HTTPError as e:
            return e.code

    seen: dict = {}
    real_warm_up = daemon.warm_up

    def observed_warm_up(p):
        seen["healthz"], seen["readyz"] = status("/healthz"), status("/readyz")
        seen["consumed"] = p.registry.get_sample_value("streamkd_messages_consumed_total")
        return real_warm_up(p)

    monkeypatch.setattr(daemon, "warm_up", observed_warm_up)
    prog = daemon.run(parts, threading.Event(), stop_when=lambda p: p.records_done >= n)
    assert seen == {"healthz": 200, "readyz": 503, "consumed": 0.0}, json.dumps(seen)
    assert parts.registry.get_sample_value("streamkd_warmup_seconds") > 0
    assert prog.samples_seen == n and prog.step == n // batch

    monkeypatch.setattr(torch, "compile", real_compile)
    ref = daemon.build(load_config(None, overrides[:-1], env={}))  # eager, same seed
    x_all = torch.cat([decode_record(v, None, Limits()).images for v in values])
    for i in range(0, n, batch):
        x = x_all[i:i + batch]
        ref.learner.step(x, ref.teacher(x), torch.full((batch,), -1))
    want = ref.learner.student.state_dict()
    for k, v in parts.learner.student.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=1e-4, atol=1e-5, msg=k)
