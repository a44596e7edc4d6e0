"""Teacher budget: the margin pick, the random share, unbiased estimates, the long-run fraction, the controller."""

from __future__ import annotations

import math

import pytest
import torch

from streamkd.learn.budget import BudgetController, Selection, random_agreement, random_correct, select, top2_margin


@pytest.fixture(autouse=True)
def one_thread():
    """Many tiny selections: intra-op threads only add synchronisation on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def logits_with_margins(margins: list[float], k: int = 4) -> torch.Tensor:
    """Logits whose softmax top-2 margin increases with ``margins`` (first class over the second)."""
    x = torch.zeros(len(margins), k)
    x[:, 0] = torch.tensor(margins)
    return x


def test_margin_pick_takes_the_least_certain():
    gaps = [3.0, 0.1, 2.0, 0.5, 5.0, 0.05, 1.0, 4.0, 0.2, 6.0]
    x = logits_with_margins(gaps)
    sel = select(x, budget=0.3, random_floor=0.0, generator=torch.Generator().manual_seed(0))
    assert not sel.random.any()
    assert sorted(sel.teacher.nonzero().flatten().tolist()) == [1, 5, 8]  # gaps 0.1, 0.05, 0.2
    margin = top2_margin(x)
    assert margin[sel.teacher].max() < margin[~sel.teacher].min()


def test_non_finite_student_rows_count_as_least_certain():
    x = logits_with_margins([0.1, 3.0, 2.0, 1.0])
    x[2, 1] = float("nan")
    sel = select(x, budget=0.25, random_floor=0.0, generator=torch.Generator().manual_seed(0))
    assert sel.teacher.nonzero().flatten().tolist() == [2]


def test_margin_pick_skips_the_random_share_and_takes_the_least_certain_of_the_rest():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 10, generator=g) * 3
    margin = top2_margin(x)
    for _ in range(20):
        sel = select(x, budget=0.4, random_floor=0.1, generator=g)
        assert not (sel.random & ~sel.teacher).any()  # random is a subset of teacher
        picked = sel.teacher & ~sel.random
        rest = ~sel.teacher
        assert margin[picked].max() <= margin[rest].min()
        assert 19 <= int(sel.random.sum()) <= 21 and 79 <= int(sel.teacher.sum()) <= 81


def test_budget_one_sends_everything_and_keeps_the_random_share():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 10, generator=g)
    sel = select(x, budget=1.0, random_floor=0.1, generator=g)
    assert sel.teacher.all()
    assert 6 <= int(sel.random.sum()) <= 7


def test_budget_below_the_random_floor_sends_only_random_samples():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(100, 10, generator=g)
    sel = select(x, budget=0.05, random_floor=0.1, generator=g)
    assert torch.equal(sel.teacher, sel.random)
    assert int(sel.teacher.sum()) == 5


def test_random_share_is_uniform_over_positions_and_margins():
    # Fixed logits with very different margins: every position must be drawn equally often.
    n, draws, floor = 20, 4000, 0.1
    x = logits_with_margins([0.1 * i for i in range(n)])
    g = torch.Generator().manual_seed(4)
    counts = torch.zeros(n)
    for _ in range(draws):
        counts += select(x, budget=0.5, random_floor=floor, generator=g).random.float()
    expected = draws * floor
    sd = math.sqrt(draws * floor * (1 - floor))
    assert (counts - expected).abs().max() < 5 * sd, counts
    assert abs(counts.sum().item() / (n * draws) - floor) < 0.005


def test_long_run_fraction_is_exact_for_small_batches():
    # budget x N = 0.625 per batch of 5: plain rounding would send 1 in 5 (0.2), flooring none.
    n, batches = 5, 5000
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 10, generator=g)
    sent = randoms = 0
    for _ in range(batches):
        sel = select(x, budget=0.125, random_floor=0.1, generator=g)
        sent += int(sel.teacher.sum())
        randoms += int(sel.random.sum())
    assert abs(sent / (n * batches) - 0.125) < 0.007
    assert abs(randoms / (n * batches) - 0.1) < 0.007


def synthetic_batch(g: torch.Generator, n: int = 64, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Student logits, and teacher logits that agree more often where the student's margin is large."""
    student = torch.randn(n, k, generator=g) * 2.5
    p_agree = 0.3 + 0.7 * top2_margin(student)
    agree = torch.rand(n, generator=g) < p_agree
    teacher = student.clone()
    top = student.argmax(1)
    other = (top + 1 + torch.randint(0, k - 1, (n,), generator=g)) % k
    teacher[~agree, other[~agree]] = student[~agree].max(1).values + 1.0  # a different argmax
    return student, teacher


def test_random_share_agreement_is_unbiased_where_the_margin_pick_is_not():
    g = torch.Generator().manual_seed(6)
    random_hits, all_rows, selected_hits = [], [], []
    for _ in range(400):
        student, teacher = synthetic_batch(g)
        sel = select(student, budget=0.25, random_floor=0.1, generator=g)
        compact = teacher[sel.teacher]  # what the teacher returns for images[sel.teacher]
        random_hits.append(random_agreement(student, compact, sel))
        all_rows.append(student.argmax(1) == teacher.argmax(1))
        selected_hits.append(student[sel.teacher].argmax(1) == compact.argmax(1))
    truth = torch.cat(all_rows).float().mean().item()
    estimate = torch.cat(random_hits).float()
    se = math.sqrt(truth * (1 - truth) / estimate.numel())
    assert abs(estimate.mean().item() - truth) < 4 * se
    # The whole teacher share is dominated by hard samples: using it would be far off.
    assert truth - torch.cat(selected_hits).float().mean().item() > 0.1


def test_random_agreement_accepts_full_or_compact_teacher_logits_and_drops_non_finite_rows():
    g = torch.Generator().manual_seed(7)
    student, teacher = synthetic_batch(g, n=40)
    sel = select(student, budget=0.5, random_floor=0.25, generator=g)
    full = random_agreement(student, teacher, sel)
    assert torch.equal(full, random_agreement(student, teacher[sel.teacher], sel))
    assert full.numel() == int(sel.random.sum())
    first_random = int(sel.random.nonzero()[0])
    teacher[first_random] = float("nan")
    assert random_agreement(student, teacher, sel).numel() == full.numel() - 1
    with pytest.raises(ValueError, match="rows"):
        random_agreement(student, teacher[:3], sel)


def test_random_correct_counts_only_labelled_random_samples():
    student = logits_with_margins([1.0] * 6)  # predicts class 0 everywhere
    sel = Selection(teacher=torch.tensor([1, 1, 1, 1, 0, 0], dtype=torch.bool),
                    random=torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.bool))
    labels = torch.tensor([0, 3, -1, 0, 0, 0])
    assert random_correct(student, labels, sel).tolist() == [True, False]


@pytest.mark.parametrize("budget, floor", [(1.5, 0.1), (-0.1, 0.1), (float("nan"), 0.1), (0.5, 2.0)])
def test_select_rejects_bad_fractions(budget, floor):
    with pytest.raises(ValueError, match="must be in"):
        select(torch.randn(4, 3), budget, floor)


def test_select_rejects_single_class_logits():
    with pytest.raises(ValueError, match="K >= 2"):
        select(torch.randn(4, 1), 0.5, 0.1)


# -- the adaptive budget ---------------------------------------------------------------------------


def test_controller_lowers_to_the_floor_while_the_student_agrees():
    c = BudgetController(floor=0.1, ceiling=0.8, target_agreement=0.9, step=0.05)
    assert c.budget == 0.8
    previous = c.budget
    for _ in range(200):
        b = c.update(0.95, drift=False)
        assert 0.1 <= b <= previous
        previous = b
    assert b == pytest.approx(0.1)


def test_controller_raises_to_the_ceiling_when_agreement_is_below_target():
    c = BudgetController(floor=0.1, ceiling=0.8, target_agreement=0.9, step=0.05)
    for _ in range(200):
        c.update(1.0)
    previous = c.budget
    for _ in range(200):
        b = c.update(0.7)
        assert previous <= b <= 0.8
        previous = b
    assert b == pytest.approx(0.8)


def test_controller_smooths_a_single_bad_batch():
    c = BudgetController(floor=0.1, ceiling=1.0, target_agreement=0.9, step=0.05)
    for _ in range(30):
        c.update(0.95)
    before = c.budget
    assert c.update(0.5) < before  # one noisy batch does not reverse the direction


def test_drift_jumps_to_the_ceiling_and_forgets_the_old_agreement():
    c = BudgetController(floor=0.1, ceiling=1.0, target_agreement=0.9, step=0.05)
    for _ in range(200):
        c.update(0.99)
    assert c.budget == pytest.approx(0.1)
    assert c.update(0.5, drift=True) == 1.0
    for _ in range(5):  # the smoothed agreement restarted on the new level: no lowering
        assert c.update(0.5) == 1.0


def test_missing_agreement_leaves_the_budget_alone():
    c = BudgetController()
    for _ in range(10):
        c.update(0.99)
    b = c.budget
    assert c.update(None) == b and c.update(float("nan")) == b
    assert c.update(None, drift=True) == c.ceiling


def test_controller_state_round_trips_and_is_clamped_to_new_limits():
    c = BudgetController(floor=0.1, ceiling=1.0)
    for _ in range(30):
        c.update(0.97)
    state = c.state_dict()
    d = BudgetController(floor=0.1, ceiling=1.0)
    d.load_state_dict(state)
    assert d.state_dict() == state
    assert c.update(0.93) == d.update(0.93)
    tight = BudgetController(floor=0.5, ceiling=0.6)
    tight.load_state_dict({"budget": 0.2, "agreement": None, "observations": 0})
    assert tight.budget == 0.5


def noisy_agreement(level: float, batches: int, seed: int, per_batch: int = 3):
    """Per-batch random-share agreement of a student that agrees with probability ``level`` (a few samples each)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batches, per_batch, generator=g) < level).float().mean(1).tolist()


@pytest.mark.parametrize("level", [0.6, 0.85, 0.97])
def test_a_settled_student_gets_the_floor_whatever_its_level(level):
    """The rule is relative: a student that holds its level needs few labels, at 0.6 agreement as at 0.97."""
    c = BudgetController(floor=0.1, ceiling=1.0)
    budgets = [c.update(a) for a in noisy_agreement(level, 2000, seed=1)]
    assert sum(budgets[200:]) / len(budgets[200:]) < 0.15
    assert min(budgets) == pytest.approx(0.1)


def test_an_absolute_target_keeps_the_budget_up_below_it():
    c = BudgetController(floor=0.1, ceiling=1.0, target_agreement=0.9)
    budgets = [c.update(a) for a in noisy_agreement(0.8, 2000, seed=2)]
    assert sum(budgets[200:]) / len(budgets[200:]) > 0.9


def test_a_lasting_fall_in_agreement_raises_the_budget_without_a_drift_signal():
    c = BudgetController(floor=0.1, ceiling=1.0)
    for a in noisy_agreement(0.9, 1000, seed=3):
        c.update(a)
    assert c.budget == pytest.approx(0.1, abs=0.05)
    budgets = [c.update(a) for a in noisy_agreement(0.6, 150, seed=4)]
    assert max(budgets) == 1.0  # the recent level fell below the held one: the teacher labels everything again
    # Once the new level is what the student holds, the budget comes down again.
    budgets = [c.update(a) for a in noisy_agreement(0.6, 3000, seed=5)]
    assert budgets[-1] < 0.3


@pytest.mark.parametrize("kw", [dict(floor=0.0), dict(floor=0.6, ceiling=0.5), dict(ceiling=1.2),
                                dict(target_agreement=0.0), dict(step=1.0), dict(drop=1.0), dict(fast=0.0),
                                dict(fast=0.01, slow=0.1)])
def test_controller_rejects_bad_settings(kw):
    with pytest.raises(ValueError):
        BudgetController(**kw)
