"""ClassPrior: the stream's long-run and recent class shares, and the step weights that undo the difference."""

from __future__ import annotations

import pytest
import torch

from streamkd.learn.prior import ClassPrior
from streamkd.learn.replay import RECENT_WINDOW

K = 4


def prior_with(counts: list[float], recent: list[float]) -> ClassPrior:
    p = ClassPrior()
    p.load_state_dict({"counts": torch.tensor(counts, dtype=torch.float64),
                       "recent": torch.tensor(recent, dtype=torch.float64)})
    return p


def rows(*per_class: int) -> torch.Tensor:
    return torch.cat([torch.full((m,), c) for c, m in enumerate(per_class)])


def test_nothing_to_weight_before_a_sample_was_seen():
    assert ClassPrior().weights(rows(2, 2), 2, 0.25) is None
    assert ClassPrior().state_dict() == {}


def test_observe_counts_every_class_and_follows_the_recent_shares():
    p = ClassPrior()
    p.observe(rows(3, 1), K)
    assert p.seen == 4
    state = p.state_dict()
    assert state["counts"].tolist() == [3, 1, 0, 0] and state["recent"].tolist() == [0.75, 0.25, 0, 0]
    p.observe(rows(0, 0, 8), K)
    keep = (1 - 1 / RECENT_WINDOW) ** 8
    state = p.state_dict()
    assert state["counts"].tolist() == [3, 1, 8, 0]
    torch.testing.assert_close(state["recent"], torch.tensor([0.75 * keep, 0.25 * keep, 1 - keep, 0],
                                                             dtype=torch.float64))


def test_a_step_of_the_expected_mix_is_weighted_to_the_long_run_mix():
    """The defining property: rows that follow the expected mix of a step (fresh rows at the recent shares, the
    replayed ones at the long-run shares, a ring share of them at the recent ones) are weighted so that the
    step's class mix is the long-run one."""
    s, r = [0.5, 0.25, 0.25, 0.0], [0.0, 0.5, 0.5, 0.0]
    p = prior_with([50, 25, 25, 0], r)
    # 8 fresh rows at r: 0, 4, 4; 8 replayed at 0.5 s + 0.5 r = [0.25, 0.375, 0.375]: 2, 3, 3.
    top1 = rows(2, 7, 7)
    w = p.weights(top1, stream_rows=8, ring_share=0.5)
    assert w.dtype == torch.float32 and w.shape == (16,)
    torch.testing.assert_close(w.mean(), torch.tensor(1.0))
    mix = torch.zeros(K).index_add_(0, top1, w) / 16
    torch.testing.assert_close(mix, torch.tensor(s))
    # Class 0 (4 of 16 rows expected from the long-run mix: 2 of them) is weighted up, the current ones down.
    assert w[0] == pytest.approx(0.5 / 0.125) and w[2] == pytest.approx(0.25 / 0.4375)


def test_a_stream_whose_mix_does_not_move_gets_weights_of_one():
    p = ClassPrior()
    for _ in range(50):
        p.observe(rows(2, 2, 2, 2), K)
    w = p.weights(rows(3, 1, 2, 2), stream_rows=4, ring_share=0.25)  # a step's own counts do not matter
    torch.testing.assert_close(w, torch.ones(8))


def test_right_after_a_new_class_arrives_its_rows_are_weighted_by_its_shares_so_far():
    """20 batches of class 0, then one of class 3: hand-worked s, r and q for a step of the 8 fresh rows and 8
    replayed rows of class 0 (a quarter of the replayed ones expected from the ring)."""
    p = ClassPrior()
    for _ in range(20):
        p.observe(rows(8), K)
    p.observe(rows(0, 0, 0, 8), K)
    keep = (1 - 1 / RECENT_WINDOW) ** 8
    s0, s3, r0, r3 = 160 / 168, 8 / 168, keep, 1 - keep
    q0 = (8 * r0 + 8 * (0.75 * s0 + 0.25 * r0)) / 16
    q3 = (8 * r3 + 8 * (0.75 * s3 + 0.25 * r3)) / 16
    w0, w3 = s0 / q0, s3 / q3
    scale = 16 / (8 * w0 + 8 * w3)
    w = p.weights(rows(8, 0, 0, 8), stream_rows=8, ring_share=0.25)
    torch.testing.assert_close(w, torch.tensor([w0 * scale] * 8 + [w3 * scale] * 8, dtype=torch.float32))
    # One batch in, the newcomer's recent share is still small: it is not held back yet.
    assert w3 > w0


def test_once_the_recent_shares_follow_a_new_class_its_rows_weigh_less_than_the_older_ones():
    p = ClassPrior()
    for _ in range(100):
        p.observe(rows(8), K)
    for _ in range(30):  # 240 samples: about 0.38 of the recent shares, 0.23 of the long-run ones
        p.observe(rows(0, 0, 0, 8), K)
    w = p.weights(rows(8, 0, 0, 8), stream_rows=8, ring_share=0.25)
    assert w[-1] < 1 < w[0]


def test_state_round_trip_and_validation():
    p = ClassPrior()
    p.observe(rows(1, 2, 3), K)
    q = ClassPrior()
    q.load_state_dict(p.state_dict())
    assert torch.equal(q.weights(rows(1, 1, 1, 1), 2, 0.0), p.weights(rows(1, 1, 1, 1), 2, 0.0))
    q.load_state_dict({})
    assert q.seen == 0
    with pytest.raises(ValueError, match="one shape"):
        q.load_state_dict({"counts": torch.zeros(3, dtype=torch.float64), "recent": torch.zeros(4)})
    with pytest.raises(ValueError, match="finite"):
        q.load_state_dict({"counts": torch.tensor([1.0, float("nan")]), "recent": torch.zeros(2)})
    with pytest.raises(ValueError, match="finite"):
        q.load_state_dict({"counts": torch.tensor([1.0, -1.0]), "recent": torch.zeros(2)})
