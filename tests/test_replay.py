"""Replay buffer: Algorithm R, the recent region, bounds, protection, and the checkpoint round trip."""

from __future__ import annotations

import io

import pytest
import torch

from streamkd.learn.replay import ReplayBuffer, bytes_per_sample

K = 10


def stream(start: int, n: int, shape=(1, 2, 2)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n samples whose label is their stream index (so a stored label says which sample it is)."""
    ids = torch.arange(start, start + n)
    images = (ids % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, *shape).contiguous()
    logits = torch.nn.functional.one_hot(ids % K, K).float() * 3 + ids.view(n, 1).float() / 1e4
    return images, logits, ids


def feed(buf: ReplayBuffer, total: int, batch: int, start: int = 0) -> None:
    for i in range(start, start + total, batch):
        buf.add(*stream(i, min(batch, start + total - i)))


def reservoir_ids(buf: ReplayBuffer) -> list[int]:
    return buf._labels[:buf._res_len].tolist()


def recent_ids(buf: ReplayBuffer) -> set[int]:
    return set(buf._labels[buf._res_cap:buf._res_cap + buf._ring_len].tolist())


def test_reservoir_matches_one_at_a_time_algorithm_r():
    # Batches larger than the capacity make one batch pick the same slot twice: the later sample must win.
    cap, seed, batches = 16, 3, [5, 40, 1, 64, 64, 7, 200, 33]
    buf = ReplayBuffer(cap, 10**9, 0.0, seed)
    g = torch.Generator().manual_seed(seed)
    ref: list[int] = []
    t = 0
    for n in batches:
        buf.add(*stream(t, n))
        u = torch.rand(n, generator=g, dtype=torch.float64)
        for i in range(n):
            if len(ref) < cap:
                ref.append(t)
            else:
                j = int(u[i].item() * (t + 1))
                if j < cap:
                    ref[j] = t
            t += 1
        assert reservoir_ids(buf) == ref, t
    assert buf.seen == sum(batches) and len(buf) == cap


def test_reservoir_is_uniform_over_the_stream():
    # Each of 2000 offered samples should be kept with probability 40/2000. Over 150 seeds, count kept
    # samples per tenth of the stream: chi-square with 9 degrees of freedom, 27.9 is its 0.999 quantile.
    cap, total, runs = 40, 2000, 150
    counts = torch.zeros(10)
    position = torch.zeros(4)  # by position inside a batch of 100: later samples must not lose collisions
    for seed in range(runs):
        buf = ReplayBuffer(cap, 10**9, 0.0, seed)
        feed(buf, total, 100)
        ids = torch.tensor(reservoir_ids(buf))
        counts += torch.bincount(ids * 10 // total, minlength=10)
        position += torch.bincount((ids % 100) // 25, minlength=4)
    expected = runs * cap / 10
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 27.9, (chi2, counts.tolist())
    expected = runs * cap / 4
    chi2 = float(((position - expected) ** 2 / expected).sum())
    assert chi2 < 16.3, (chi2, position.tolist())  # 3 degrees of freedom, 0.999 quantile


def test_recent_region_holds_the_latest_samples_and_gets_its_share_of_draws():
    buf = ReplayBuffer(100, 10**9, 0.25, 0)
    feed(buf, 3000, 64)
    assert buf._ring_cap == 25 and buf._res_cap == 75
    latest = set(range(3000 - 25, 3000))
    assert recent_ids(buf) == latest
    drawn = torch.cat([buf.sample(7)[2] for _ in range(2000)])  # 7 * 0.25: exercises the stochastic rounding
    share = sum(int(i) in latest for i in drawn.tolist()) / drawn.numel()
    # 0.25 from the recent region, plus the rare reservoir slot that holds one of the latest samples.
    assert 0.23 < share < 0.28

    plain = ReplayBuffer(100, 10**9, 0.0, 0)
    feed(plain, 3000, 64)
    drawn = torch.cat([plain.sample(7)[2] for _ in range(2000)])
    assert sum(int(i) in latest for i in drawn.tolist()) / drawn.numel() < 0.05


def test_a_draw_can_ask_for_its_own_recent_share():
    buf = ReplayBuffer(100, 10**9, 0.25, 0)
    feed(buf, 3000, 64)
    latest = set(range(3000 - 25, 3000))
    assert set(buf.sample(200, recent=1.0)[2].tolist()) <= latest
    drawn = torch.cat([buf.sample(7, recent=0.5)[2] for _ in range(2000)])
    assert 0.48 < sum(int(i) in latest for i in drawn.tolist()) / drawn.numel() < 0.53
    only_old = buf.sample(400, recent=0.0)[2].tolist()
    assert sum(i in latest for i in only_old) < 20  # the reservoir, which rarely holds one of the latest
    with pytest.raises(ValueError, match="recent"):
        buf.sample(4, recent=1.5)


def test_ring_share_is_the_share_of_a_draw_from_the_recent_region():
    buf = ReplayBuffer(100, 10**9, 0.25, 0)
    assert buf.ring_share() == 0.0  # empty: nothing comes from the ring
    feed(buf, 3000, 64)  # the reservoir and the ring both hold samples
    assert buf.ring_share() == 0.25 and buf.ring_share(0.6) == 0.6
    drawn = torch.cat([buf.sample(8)[2] for _ in range(2000)])
    latest = set(range(3000 - 25, 3000))  # the ring; the reservoir rarely holds one of them
    assert 0.24 < sum(int(i) in latest for i in drawn.tolist()) / drawn.numel() < 0.28
    fifo = ReplayBuffer(30, 10**9, 1.0, 0)
    feed(fifo, 10, 10)
    assert fifo.ring_share() == 1.0 and ReplayBuffer(30, 10**9, 0.0, 0).ring_share() == 0.0


def test_recency_share_one_is_a_fifo():
    buf = ReplayBuffer(30, 10**9, 1.0, 0)
    feed(buf, 500, 17)
    assert buf._res_cap == 0 and recent_ids(buf) == set(range(470, 500))
    assert set(buf.sample(200)[2].tolist()) <= set(range(470, 500))


def test_samples_are_copies_with_float32_logits():
    buf = ReplayBuffer(50, 10**9, 0.2, 0)
    feed(buf, 50, 50)
    images, logits, labels, _ = buf.sample(20)
    assert images.dtype == torch.uint8 and images.shape == (20, 1, 2, 2)
    assert logits.dtype == torch.float32 and logits.shape == (20, K) and labels.dtype == torch.int64
    # Stored logits are fp16 of the offered ones: the top-1 survives, values within fp16 rounding.
    assert torch.equal(logits.argmax(1), labels % K)
    assert torch.allclose(logits, stream(0, 50)[1][labels], atol=2e-3)
    images.fill_(0)
    assert buf._images[:len(buf)].any()


def test_byte_bound_caps_the_capacity():
    per = bytes_per_sample((1, 2, 2), K)
    assert per == 4 + 2 * K + 8
    buf = ReplayBuffer(1000, 12 * per + per - 1, 0.25, 0)
    assert buf.nbytes == 0 and len(buf) == 0
    feed(buf, 400, 32)
    assert buf.slots == 12 and len(buf) == 12
    assert buf.nbytes == 12 * per <= buf.max_bytes
    # The sample count wins when it is the tighter bound.
    small = ReplayBuffer(5, 10**9, 0.0, 0)
    feed(small, 100, 32)
    assert small.slots == 5 and small.nbytes == 5 * per


def test_budget_below_one_sample_fails_naming_max_bytes():
    buf = ReplayBuffer(10, 10, 0.0, 0)
    with pytest.raises(ValueError, match="max_bytes=10"):
        buf.add(*stream(0, 1))


def test_rows_with_non_finite_logits_are_not_stored_or_counted():
    buf = ReplayBuffer(10, 10**9, 0.0, 0)
    images, logits, labels = stream(0, 4)
    logits[1, 0] = float("nan")
    logits[2, 3] = float("inf")
    buf.add(images, logits, labels)
    assert buf.seen == 2 and sorted(reservoir_ids(buf)) == [0, 3]


def test_huge_logits_are_clamped_into_fp16():
    buf = ReplayBuffer(10, 10**9, 0.0, 0)
    images, logits, labels = stream(0, 2)
    logits[0, 0] = 1e6
    buf.add(images, logits, labels)
    assert torch.isfinite(buf.contents()[1]).all()


def test_shape_changes_and_bad_inputs_are_refused():
    buf = ReplayBuffer(10, 10**9, 0.0, 0)
    buf.add(*stream(0, 3))
    with pytest.raises(ValueError, match="shape of the first"):
        buf.add(*stream(3, 3, shape=(1, 3, 3)))
    images, logits, labels = stream(0, 3)
    with pytest.raises(ValueError, match="uint8"):
        buf.add(images.float(), logits, labels)
    with pytest.raises(ValueError, match="logits"):
        buf.add(images, logits[:2], labels)
    with pytest.raises(ValueError, match="recency_share"):
        ReplayBuffer(10, 10, 1.5, 0)


def test_empty_buffer_samples_none():
    buf = ReplayBuffer(10, 10**9, 0.5, 0)
    assert buf.sample(4) is None
    buf.add(*stream(0, 3))
    assert buf.sample(0) is None and buf.sample(4)[0].shape[0] == 4


def test_protect_freezes_the_reservoir_while_recent_samples_still_arrive():
    buf = ReplayBuffer(40, 10**9, 0.25, 0)
    feed(buf, 200, 20)
    frozen = reservoir_ids(buf)
    buf.protect(300)
    assert buf.protected
    feed(buf, 300, 20, start=200)
    assert reservoir_ids(buf) == frozen
    assert recent_ids(buf) == set(range(490, 500)) and buf.seen == 500
    assert not buf.protected
    feed(buf, 1000, 20, start=500)
    assert max(reservoir_ids(buf)) >= 500  # replacement resumed


def test_protect_before_the_reservoir_is_full_leaves_it_part_filled():
    buf = ReplayBuffer(40, 10**9, 0.0, 0)
    feed(buf, 10, 10)
    buf.protect(15)
    feed(buf, 20, 10, start=10)  # samples 10..24 protected, 25..29 fill
    assert reservoir_ids(buf) == list(range(10)) + list(range(25, 30))


def _tensors_and_ints_only(obj) -> bool:
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _tensors_and_ints_only(v) for k, v in obj.items())
    return isinstance(obj, (torch.Tensor, int))


def round_trip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("share", [0.0, 0.3, 1.0])
def test_state_round_trip_gives_identical_future_samples(share):
    a = ReplayBuffer(60, 10**9, share, 7)
    feed(a, 913, 25)  # leaves the ring's write position mid-ring
    a.protect(50)
    a.sample(5)
    state = a.state_dict()
    assert _tensors_and_ints_only(state)
    b = ReplayBuffer(60, 10**9, share, 12345)  # the seed comes from the state
    b.load_state_dict(round_trip(state))
    assert len(b) == len(a) and b.seen == a.seen and b.revision == a.revision and b.protected
    for i in range(20):
        batch = stream(913 + 25 * i, 25)
        a.add(*batch)
        b.add(*batch)
        for x, y in zip(a.sample(16), b.sample(16), strict=True):
            assert torch.equal(x, y)
    assert torch.equal(a._labels, b._labels)


def test_state_of_an_unused_buffer_round_trips():
    a = ReplayBuffer(10, 10**9, 0.5, 1)
    b = ReplayBuffer(10, 10**9, 0.5, 2)
    b.load_state_dict(round_trip(a.state_dict()))
    assert len(b) == 0 and b.nbytes == 0
    for buf in (a, b):
        feed(buf, 30, 10)
    assert torch.equal(a._labels, b._labels)


def test_state_loads_into_a_smaller_buffer_keeping_the_latest_recent_samples():
    a = ReplayBuffer(100, 10**9, 0.2, 0)  # ring of 20
    feed(a, 1000, 30)
    b = ReplayBuffer(50, 10**9, 0.2, 0)  # ring of 10, reservoir of 40
    b.load_state_dict(round_trip(a.state_dict()))
    assert recent_ids(b) == set(range(990, 1000))
    assert reservoir_ids(b) == reservoir_ids(a)[:40]
    b.add(*stream(1000, 3))
    assert recent_ids(b) == set(range(993, 1003))


def test_state_from_something_else_is_refused():
    buf = ReplayBuffer(10, 10**9, 0.5, 1)
    with pytest.raises(ValueError, match="replay"):
        buf.load_state_dict({"format": 1, "seen": -1})
    with pytest.raises(ValueError, match="replay"):
        buf.load_state_dict({"weights": {}})


# -- class balance ---------------------------------------------------------------------------------


def of_classes(classes: list[int], start: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Samples whose teacher top-1 class is ``classes[i]``; the label is the stream index."""
    n = len(classes)
    ids = torch.arange(start, start + n)
    images = (ids % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    logits = torch.nn.functional.one_hot(torch.tensor(classes), K).float() * 3
    return images, logits, ids


def feed_classes(buf: ReplayBuffer, classes: list[int], batch: int = 32, start: int = 0) -> None:
    for i in range(0, len(classes), batch):
        buf.add(*of_classes(classes[i:i + batch], start + i))


def stored_classes(buf: ReplayBuffer) -> list[int]:
    return torch.bincount(buf._logits[:buf._res_len].float().argmax(1), minlength=K).tolist()


def imbalanced(seed: int) -> list[int]:
    """3000 of class 0, 1000 of class 1, 5 of each of classes 2..9, shuffled."""
    classes = torch.tensor([0] * 3000 + [1] * 1000 + [c for c in range(2, K) for _ in range(5)])
    return classes[torch.randperm(len(classes), generator=torch.Generator().manual_seed(seed))].tolist()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_reservoir_keeps_every_sample_of_rare_classes(seed):
    stream_classes = imbalanced(seed)
    buf = ReplayBuffer(100, 10**9, 0.0, seed, balance=True)
    feed_classes(buf, stream_classes)
    counts = stored_classes(buf)
    assert len(buf) == 100 and sum(counts) == 100
    assert counts[2:] == [5] * 8  # all of each rare class
    assert abs(counts[0] - counts[1]) <= 1  # the two large ones share the rest evenly
    # The plain reservoir keeps the stream's proportions: the rare classes all but vanish.
    plain = ReplayBuffer(100, 10**9, 0.0, seed)
    feed_classes(plain, stream_classes)
    assert sum(stored_classes(plain)[2:]) < 10 and stored_classes(plain)[0] > 60


def test_balanced_reservoir_is_uniform_within_a_class():
    # Class 0 arrives 4000 times among other classes; its kept samples must be uniform over its stream.
    counts = torch.zeros(4)
    for seed in range(40):
        stream_classes = imbalanced(seed)
        buf = ReplayBuffer(100, 10**9, 0.0, seed, balance=True)
        feed_classes(buf, stream_classes)
        ids = buf._labels[:buf._res_len]
        mine = ids[buf._logits[:buf._res_len].float().argmax(1) == 0]
        ranks = torch.tensor([stream_classes[:i].count(0) for i in mine.tolist()])  # index within class 0
        counts += torch.bincount(ranks * 4 // 3000, minlength=4)
    expected = counts.sum() / 4
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.3, (chi2, counts.tolist())  # 3 degrees of freedom, 0.999 quantile


def test_balanced_reservoir_matches_the_plain_one_while_filling_and_stays_bounded():
    per = bytes_per_sample((1, 2, 2), K)
    buf = ReplayBuffer(1000, 40 * per, 0.25, 0, balance=True)
    feed_classes(buf, [i % K for i in range(25)])
    assert reservoir_ids(buf) == list(range(25))  # nothing replaced before the reservoir is full
    feed_classes(buf, imbalanced(0), start=25)
    assert buf.slots == 40 and len(buf) == 40 and buf.nbytes == 40 * per <= buf.max_bytes
    assert sorted(len(s) for s in buf._slots) == sorted(stored_classes(buf))  # bookkeeping matches the slots


def test_balanced_draws_fill_up_the_classes_the_fresh_samples_lack():
    # Classes 0..7 first, then only 8 and 9: the reservoir holds all ten; the fresh rows and the recent
    # region bring 8 and 9, so the reservoir's draws go to the eight older classes, evenly.
    old = [i % 8 for i in range(4000)]
    new = [8 + i % 2 for i in range(2000)]
    buf = ReplayBuffer(200, 10**9, 0.25, 0, balance=True)
    feed_classes(buf, old)
    feed_classes(buf, new, start=4000)
    assert min(stored_classes(buf)) > 0
    drawn = torch.cat([buf.sample(32, fresh=32)[1].argmax(1) for _ in range(500)])
    share = torch.bincount(drawn, minlength=K).double() / drawn.numel()
    assert 0.24 < float(share[8:].sum()) < 0.27  # the recent region's quarter, nothing more
    assert float(share[:8].min()) > 0.08 and float(share[:8].max()) < 0.11  # 0.75 / 8 each
    plain = ReplayBuffer(200, 10**9, 0.25, 0)
    feed_classes(plain, old)
    feed_classes(plain, new, start=4000)
    drawn = torch.cat([plain.sample(32, fresh=32)[1].argmax(1) for _ in range(500)])
    assert float((drawn >= 8).double().mean()) > 0.4


def test_balanced_draws_on_a_balanced_stream_are_uniform_over_classes():
    buf = ReplayBuffer(200, 10**9, 0.0, 0, balance=True)
    feed_classes(buf, torch.randint(0, K, (3000,), generator=torch.Generator().manual_seed(0)).tolist())
    drawn = torch.cat([buf.sample(32, fresh=32)[1].argmax(1) for _ in range(500)])
    share = torch.bincount(drawn, minlength=K).double() / drawn.numel()
    assert float(share.min()) > 0.08 and float(share.max()) < 0.12


def test_balanced_state_round_trips_and_loads_across_the_setting():
    a = ReplayBuffer(60, 10**9, 0.3, 7, balance=True)
    feed_classes(a, imbalanced(3)[:900], batch=25)
    state = a.state_dict()
    assert _tensors_and_ints_only(state)
    b = ReplayBuffer(60, 10**9, 0.3, 99, balance=True)
    b.load_state_dict(round_trip(state))
    assert b._class_seen == a._class_seen and b._full == a._full and torch.equal(b._recent, a._recent)
    rest = imbalanced(3)[900:1400]
    for buf in (a, b):
        feed_classes(buf, rest, batch=25, start=900)
    assert torch.equal(a._labels, b._labels)
    assert torch.equal(a.sample(16, fresh=16)[2], b.sample(16, fresh=16)[2])
    # A plain buffer's state loads into a balanced one (class counts estimated) and the other way round.
    plain = ReplayBuffer(60, 10**9, 0.3, 7)
    feed_classes(plain, imbalanced(3)[:900], batch=25)
    c = ReplayBuffer(60, 10**9, 0.3, 7, balance=True)
    c.load_state_dict(round_trip(plain.state_dict()))
    assert sum(len(s) for s in c._slots) == c._res_len and sum(c._class_seen) >= c._res_len
    feed_classes(c, rest, batch=25, start=900)
    assert stored_classes(c)[2:].count(0) < stored_classes(plain)[2:].count(0) or min(stored_classes(c)[2:]) > 0
    d = ReplayBuffer(60, 10**9, 0.3, 7)
    d.load_state_dict(round_trip(a.state_dict()))
    assert len(d) == len(a)


# -- prioritized draws -------------------------------------------------------------------------------

def prioritized(priority: float, n: int = 100) -> ReplayBuffer:
    """A reservoir-only buffer of samples 0..n-1 whose priority is 1 for even ids and 0 for odd ones."""
    buf = ReplayBuffer(n, 10**9, 0.0, 3, priority=priority)
    images, logits, ids = stream(0, n)
    buf.add(images, logits, ids, (ids % 2 == 0).float())
    return buf


def test_prioritized_draws_follow_the_priorities():
    # Slot weights (p + 0.01) ** 1: an even sample 1.01, an odd one 0.01, so about 1 draw in 101 is odd.
    buf = prioritized(1.0)
    drawn = torch.cat([buf.sample(64)[2] for _ in range(100)])
    odd = float((drawn % 2 == 1).float().mean())
    assert odd < 0.03
    assert {i for i in drawn.tolist() if i % 2 == 0} == set(range(0, 100, 2))  # every even sample is drawn
    # Exponent 0: the priorities are kept but the draws are uniform.
    flat = prioritized(0.0)
    uniform = torch.cat([flat.sample(64)[2] for _ in range(100)])
    assert 0.45 < float((uniform % 2 == 1).float().mean()) < 0.55


def test_the_exponent_flattens_the_priorities():
    # (p + 0.01) ** 0.5: 1.005 against 0.1, so about 9 % of the draws are odd.
    buf = prioritized(0.5)
    drawn = torch.cat([buf.sample(64)[2] for _ in range(200)])
    assert 0.07 < float((drawn % 2 == 1).float().mean()) < 0.11


def test_reprioritize_sets_the_drawn_slots_priority_and_keeps_the_larger_for_a_repeat():
    buf = prioritized(1.0, n=10)
    slots = torch.tensor([0, 2, 2, 4])
    buf.reprioritize(slots, torch.tensor([0.0, 0.5, 0.25, float("nan")]))
    assert buf._prio[[0, 2, 4]].tolist() == [0.0, 0.5, 1.0]  # nan counts as 1
    buf.reprioritize(torch.tensor([6]), torch.tensor([float("inf")]))
    assert buf._prio[6] == 1e4  # clamped
    with pytest.raises(ValueError, match="one divergence per slot"):
        buf.reprioritize(slots, torch.zeros(3))
    # The slots returned by a draw are where its rows came from.
    draw = buf.sample(32)
    assert torch.equal(buf._labels[draw.slots], draw.labels)


def test_a_sample_the_student_has_learnt_is_rarely_drawn_again():
    buf = ReplayBuffer(20, 10**9, 0.0, 0, priority=1.0)
    images, logits, ids = stream(0, 20)
    buf.add(images, logits, ids, torch.ones(20))
    buf.reprioritize(torch.arange(10), torch.zeros(10))  # ids 0..9 now match the teacher
    drawn = torch.cat([buf.sample(32)[2] for _ in range(100)])
    assert float((drawn < 10).float().mean()) < 0.03


def test_priorities_without_a_value_are_one_and_wrong_shapes_are_refused():
    buf = ReplayBuffer(10, 10**9, 0.0, 0, priority=1.0)
    buf.add(*stream(0, 10))
    assert buf._prio.tolist() == [1.0] * 10
    with pytest.raises(ValueError, match="priority must be float N"):
        buf.add(*stream(10, 4), torch.ones(3))
    with pytest.raises(ValueError, match="priority must be a finite number"):
        ReplayBuffer(10, 10**9, 0.0, 0, priority=-1.0)


def test_non_finite_teacher_rows_drop_their_priority_too():
    buf = ReplayBuffer(10, 10**9, 0.0, 0, priority=1.0)
    images, logits, ids = stream(0, 4)
    logits[1, 0] = float("nan")
    buf.add(images, logits, ids, torch.tensor([0.1, 0.2, 0.3, 0.4]))
    assert buf._labels[:3].tolist() == [0, 2, 3] and buf._prio[:3].tolist() == pytest.approx([0.1, 0.3, 0.4])


@pytest.mark.parametrize("share", [0.0, 0.3])
def test_priorities_round_trip_with_identical_future_draws(share):
    a = ReplayBuffer(60, 10**9, share, 7, priority=1.0)
    g = torch.Generator().manual_seed(0)
    for i in range(0, 400, 25):
        a.add(*stream(i, 25), torch.rand(25, generator=g))
        draw = a.sample(16)
        a.reprioritize(draw.slots, torch.rand(16, generator=g))
    state = a.state_dict()
    assert _tensors_and_ints_only(state) and "reservoir_priority" in state
    b = ReplayBuffer(60, 10**9, share, 1, priority=1.0)
    b.load_state_dict(round_trip(state))
    assert torch.equal(a._prio, b._prio)
    for i in range(10):
        batch, p = stream(400 + 25 * i, 25), torch.rand(25, generator=g)
        a.add(*batch, p)
        b.add(*batch, p)
        da, db = a.sample(16), b.sample(16)
        for x, y in zip(da, db, strict=True):
            assert torch.equal(x, y)
        d = torch.rand(16, generator=g)
        a.reprioritize(da.slots, d)
        b.reprioritize(db.slots, d)


def test_a_state_saved_without_priorities_loads_with_priority_one():
    a = ReplayBuffer(20, 10**9, 0.25, 7, priority=1.0)
    a.add(*stream(0, 20), torch.full((20,), 0.5))
    state = {k: v for k, v in a.state_dict().items() if not k.endswith("_priority")}
    b = ReplayBuffer(20, 10**9, 0.25, 7, priority=1.0)
    b.load_state_dict(round_trip(state))
    assert len(b) == 20 and b._prio.tolist() == [1.0] * 20
    bad = dict(a.state_dict(), reservoir_priority=torch.zeros(3))
    with pytest.raises(ValueError, match="reservoir_priority"):
        b.load_state_dict(round_trip(bad))
