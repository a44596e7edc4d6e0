"""ClassPrior: the stream's long-run and recent class shares, and the step weights that undo the difference."""

from __future__ import annotations

import pytest
import torch

from streamkd.learn.prior import ClassPrior, recent_window
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


def test_the_long_run_counts_take_the_step_in_and_the_recent_shares_leave_it_out():
    p = ClassPrior()
    p.observe(rows(3, 1), K)
    p.observe(rows(0, 0, 8), K)
    state = p.state_dict()
    assert state["counts"].tolist() == [3, 1, 8, 0]
    assert state["recent"].tolist() == [0.75, 0.25, 0, 0]  # the first step's shares; the second is pending
    p.observe(rows(0, 0, 0, 4), K)
    keep = (1 - 1 / RECENT_WINDOW) ** 8
    torch.testing.assert_close(p.state_dict()["recent"], torch.tensor([0.75 * keep, 0.25 * keep, 1 - keep, 0],
                                                                     dtype=torch.float64))


def test_rows_with_non_finite_teacher_logits_are_not_counted():
    p = ClassPrior()
    p.observe(rows(2, 2), K, valid=torch.tensor([True, False, True, True]))
    assert p.state_dict()["counts"].tolist() == [1, 2, 0, 0]


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
    # Class 0 (expected 2 rows in 16, long-run share a half) is weighted up, the current ones down.
    assert w[0] == pytest.approx(0.5 / 0.125) and w[2] == pytest.approx(0.25 / 0.4375)


def test_a_stream_whose_mix_does_not_move_gets_weights_of_one():
    p = ClassPrior()
    for _ in range(50):
        p.observe(rows(2, 2, 2, 2), K)
    w = p.weights(rows(3, 1, 2, 2), stream_rows=4, ring_share=0.25)  # a step's own counts do not matter
    torch.testing.assert_close(w, torch.ones(8))


def test_with_a_thousand_classes_a_steady_stream_stays_near_one():
    """The recent window grows with the classes (50 samples each), and the step's own rows are not in it: on a
    uniform stream of 1,000 classes the fresh rows' weights average 1 and spread little."""
    assert recent_window(10) == RECENT_WINDOW and recent_window(1000) == 50_000
    g = torch.Generator().manual_seed(0)
    p = ClassPrior()
    fresh = []
    for i in range(4000):
        top1 = torch.randint(0, 1000, (32,), generator=g)
        p.observe(top1, 1000)
        if i >= 3000:
            fresh.append(p.weights(torch.cat([top1, torch.randint(0, 1000, (32,), generator=g)]), 32, 0.25)[:32])
    w = torch.cat(fresh)
    assert abs(float(w.mean()) - 1.0) < 0.02 and float(w.std()) < 0.2


def test_a_class_new_to_the_stream_is_held_to_the_bound_then_weighs_less_once_recent():
    """20 steps of class 0, then one of class 3: the recent shares (before the step) have no class 3 yet, so its
    rows take the bound n / ((n - f)(1 - ρ)) before the scaling. Once the recent shares follow it, its rows are
    over its long-run share in a step and weigh less than class 0's."""
    p = ClassPrior()
    for _ in range(20):
        p.observe(rows(8), K)
    p.observe(rows(0, 0, 0, 8), K)
    s0 = 160 / 168  # class 3: 8 / 168 of the long run, none of the recent shares: q3 = (8 · 0.75 · s3) / 16
    q0 = (8 * 1.0 + 8 * (0.75 * s0 + 0.25 * 1.0)) / 16
    w0, w3 = s0 / q0, 16 / (8 * 0.75)
    scale = 16 / (8 * w0 + 8 * w3)
    w = p.weights(rows(8, 0, 0, 8), stream_rows=8, ring_share=0.25)
    torch.testing.assert_close(w, torch.tensor([w0 * scale] * 8 + [w3 * scale] * 8, dtype=torch.float32))
    for _ in range(80):
        p.observe(rows(8), K)
    for _ in range(30):  # class 3: 248 of 1,048 samples so far, about 0.38 of the recent shares
        p.observe(rows(0, 0, 0, 8), K)
    w = p.weights(rows(8, 0, 0, 8), stream_rows=8, ring_share=0.25)
    assert w[-1] < 1 < w[0]


def test_seeded_counts_and_state_round_trip_and_validation():
    p = ClassPrior()
    p.seed(torch.tensor([30.0, 10.0, 0.0, 0.0]), None)
    torch.testing.assert_close(p.weights(rows(1, 1), 1, 0.0), torch.ones(2))  # recent = the counts' shares
    p.observe(rows(1, 2, 3), K)
    q = ClassPrior()
    q.load_state_dict(p.state_dict())
    assert all(torch.equal(v, q.state_dict()[k]) for k, v in p.state_dict().items() if v is not None)
    assert torch.equal(q.weights(rows(1, 1, 1, 1), 2, 0.0), p.weights(rows(1, 1, 1, 1), 2, 0.0))
    q.load_state_dict({})
    assert q.num_classes == 0
    with pytest.raises(ValueError, match="shape"):
        q.load_state_dict({"counts": torch.zeros(3, dtype=torch.float64), "recent": torch.zeros(4)})
    with pytest.raises(ValueError, match="finite"):
        q.load_state_dict({"counts": torch.tensor([1.0, float("nan")])})
    with pytest.raises(ValueError, match="finite"):
        q.load_state_dict({"counts": torch.tensor([1.0, 1.0]), "recent": torch.tensor([1.0, -1.0])})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_shares_stay_on_the_device_with_no_host_sync():
    """The step's weights come without a copy to the host (torch raises on a sync in "error" mode), and match
    the CPU's."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 10, (32,), generator=g), torch.randint(0, 10, (64,), generator=g)) for _ in range(6)]
    on, off = ClassPrior(), ClassPrior()
    on.observe(batches[0][0].cuda(), 10)
    off.observe(batches[0][0], 10)
    device = [(fresh.cuda(), step.cuda()) for fresh, step in batches]
    valid = torch.ones(32, dtype=torch.bool, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for fresh, step in device[1:]:
            on.observe(fresh, 10, valid)
            w = on.weights(step, 32, 0.25)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for fresh, step in batches[1:]:
        off.observe(fresh, 10, torch.ones(32, dtype=torch.bool))
        want = off.weights(step, 32, 0.25)
    assert w.device.type == "cuda" and on.state_dict()["counts"].device.type == "cpu"
    torch.testing.assert_close(w.cpu(), want)
