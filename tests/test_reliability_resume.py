"""Resume after kill -9 keeps the replay buffer: the daemon as a subprocess against a real broker.

The restarted daemon must start from the newest checkpoint's buffer (same samples, in the same slots, with
the same teacher logits) and still train every record into the surviving lineage exactly once; the buffer
itself then holds every record of the lineage exactly once (a pure reservoir larger than the stream).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port, produce_values, write_config
from test_reliability_kafka import assert_exactly_once, tiny_npy, wait_committed

from streamkd.learn.replay import ReplayBuffer
from streamkd.state.checkpoint import CheckpointStore, TrainState

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

CAPACITY = 4096  # more than the stream: a pure reservoir then keeps every sample, in arrival order
SETTINGS = {
    "train": {"batch_size": 16, "device": os.environ.get("STREAMKD_TEST_DEVICE", "cpu")},
    "input": {"max_wait_ms": 50},
    "checkpoint": {"every_steps": 3, "every_seconds": 1, "keep": 3},
    "snapshot": {"every_steps": 50, "every_seconds": 5, "keep": 3},
    "replay": {"enabled": True, "capacity": CAPACITY, "recency_share": 0.0, "ratio": 1.0, "priority": 1.0},
    # A drift reaction freezes the reservoir, which would keep later samples out of it.
    "drift": {"enabled": False},
}


def key(image) -> bytes:
    """An image's identity: its pixels (each tiny_npy(i) is distinct)."""
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).reshape(-1)).tobytes()


def buffer_of(state: TrainState) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, logits) of the replay buffer a checkpoint holds, loaded the way the daemon loads it."""
    assert "replay" in state.learning, f"checkpoint step {state.step} holds no replay buffer"
    prio = state.learning["replay"]["reservoir_priority"]  # prioritized draws: the measured priorities are kept
    assert prio.numel() and bool((prio != 1.0).any())
    buf = ReplayBuffer(CAPACITY, 64 << 20, 0.0, seed=0)
    buf.load_state_dict(state.learning["replay"])
    images, logits, _ = buf.contents()
    return images, logits


def wait_checkpointed(d, samples: int, timeout: float) -> None:
    """Until this process has written two checkpoints and trained at least ``samples`` samples."""
    d.wait_metric("streamkd_checkpoints_written_total", 2, timeout=timeout)
    d.wait_metric("streamkd_samples_trained_total", samples, timeout=timeout)


def test_kill9_resumes_with_the_newest_checkpoints_replay_buffer(broker, topic, tmp_path: Path, daemon_factory):
    n1, n2 = 600, 300
    values = [tiny_npy(i) for i in range(n1 + n2)]
    first = produce_values(broker.bootstrap, topic, values[:n1])
    # (partition, offset) -> image key, for both rounds (produce_values sends round-robin from partition 0)
    at = {(i % 3, i // 3): key(np.load(io.BytesIO(values[i]))) for i in range(n1)}
    at.update({(j % 3, first[j % 3] + j // 3): key(np.load(io.BytesIO(values[n1 + j]))) for j in range(n2)})
    port = free_port()
    config = write_config(tmp_path, broker.bootstrap, topic, port, **SETTINGS)

    d = daemon_factory(config, port)
    wait_checkpointed(d, 160, timeout=60)
    d.kill()

    # What the restart resumes from: the newest checkpoint that verifies, read as the daemon reads it.
    state = CheckpointStore(tmp_path / "ckpt", keep=3).load_latest()
    assert state is not None and state.samples_seen > 0
    images0, logits0 = buffer_of(state)
    assert images0.shape[0] == state.samples_seen  # every trained sample, none of the killed process's later work
    trained0 = {at[(int(p), o)] for p, end in state.offsets[topic].items() for o in range(end)}
    assert len(trained0) == state.samples_seen and {key(x) for x in images0} == trained0

    second = produce_values(broker.bootstrap, topic, values[n1:])
    counts = {p: first[p] + second[p] for p in first}
    d = daemon_factory(config, port)
    wait_committed(d, broker.bootstrap, topic, counts, timeout=90)
    trained_here = d.metric("streamkd_samples_trained_total")
    buffered = d.metric("streamkd_replay_buffer_samples")
    assert d.stop() == 0, d.tail()
    n = n1 + n2
    assert trained_here == n - state.samples_seen, d.tail()  # the rest of the stream, once
    assert buffered == n, f"the restarted buffer holds {buffered} samples: it did not start from the checkpoint's"
    assert_exactly_once(tmp_path, broker.bootstrap, topic, counts, trained=n)

    # The final buffer: the checkpoint's samples first, unchanged (pixels and teacher logits), then the rest of
    # the stream; every record of the lineage exactly once.
    final = CheckpointStore(tmp_path / "ckpt", keep=3).load_latest()
    assert final is not None and final.samples_seen == n
    images1, logits1 = buffer_of(final)
    k = images0.shape[0]
    assert torch.equal(images1[:k], images0) and torch.equal(logits1[:k], logits0)
    keys1 = [key(x) for x in images1]
    assert len(keys1) == len(set(keys1)) == n and set(keys1) == set(at.values())
