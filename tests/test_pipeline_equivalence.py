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
from streamkd.broker import ensure_topics
from streamkd.config import load_config
from streamkd.decode import Decoded, Limits, decode_record

pytestmark = [pytest.mark.kafka]


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
                 "kafka.max_poll_records=7"]  # small polls: batches must not depend on poll boundaries
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
