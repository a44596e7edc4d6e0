"""The teacher budget: which samples of a batch the teacher labels, and how large that share is.

The student scores every incoming sample (forward only). :func:`select` sends a share of the batch to the
teacher: a uniformly random part (the *random share*) plus the least certain of the rest by the student's
top-2 softmax margin. Samples not sent are not trained on. Only the random share is an unbiased sample of
the stream, so agreement and accuracy estimates come from it alone (:func:`random_agreement`,
:func:`random_correct`); the margin-chosen samples are the hard ones and would bias them low.

:class:`BudgetController` adapts the budget between a floor and a ceiling: up when the student's agreement
on the random share falls below the level it has held (or below an optional absolute target) or drift is
detected, down while the student keeps its level.

Configuration keys (section ``teacher``):

- ``teacher.budget``: fraction of samples sent to the teacher, a float in (0, 1], or ``"adaptive"``
  (:class:`BudgetController`). Default 1.0 (every sample, the loop without a budget).
- ``teacher.budget_floor``: lowest adaptive budget. Default 0.25.
- ``teacher.budget_ceiling``: highest adaptive budget (and the budget right after a drift). Default 1.0.
- ``teacher.random_share``: fraction of every batch sent to the teacher uniformly at random, for the
  unbiased estimates and the drift detector. Default 0.1. When the budget is below it, everything sent is
  random.
- ``teacher.agreement_drop``: the adaptive budget rises while the recent agreement on the random share is
  more than this below the level the student has held. Default 0.05.
- ``teacher.target_agreement``: optional absolute level: the adaptive budget also rises while the recent
  agreement is below it. Default none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Selection:
    """Which samples of a batch of N go to the teacher.

    ``teacher``: bool N, the samples the teacher labels. ``random``: bool N, the uniformly random part of
    them (a subset of ``teacher``); the rest of ``teacher`` are the lowest-margin samples.
    """

    teacher: torch.Tensor
    random: torch.Tensor

    @property
    def random_in_teacher(self) -> torch.Tensor:
        """bool M (M = number of teacher samples): which rows of the teacher's compacted output are random."""
        return self.random[self.teacher]


def _check_fraction(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def top2_margin(logits: torch.Tensor) -> torch.Tensor:
    """Top-2 softmax margin, float32 N: p(first) - p(second) in [0, 1]; small = uncertain.

    Rows with non-finite logits get -1, so they count as the least certain of all.
    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be N x K with K >= 2, got shape {tuple(logits.shape)}")
    top = torch.softmax(logits.detach().float(), dim=1).topk(2, dim=1).values
    return torch.nan_to_num(top[:, 0] - top[:, 1], nan=-1.0)


@torch.no_grad()
def select(student_logits: torch.Tensor, budget: float, random_floor: float,
           generator: torch.Generator | None = None) -> Selection:
    """Choose the samples the teacher labels from the student's logits (float N x K, any device).

    ``budget`` (in [0, 1]) is the expected fraction sent, ``random_floor`` (in [0, 1]) the expected fraction
    chosen uniformly at random (at most the budget). Both counts are rounded stochastically with one shared
    uniform draw: E[count] = fraction x N exactly, so small batches are unbiased and the long-run fraction
    converges to the budget, and the random count never exceeds the total. The rest of the budget goes to
    the non-random samples with the smallest top-2 margin. budget 1.0 sends every sample.

    ``generator`` is a CPU generator (counts and the random subset are drawn on the host); masks are
    returned on the logits' device.
    """
    budget = _check_fraction("budget", budget)
    random_floor = min(_check_fraction("random_floor", random_floor), budget)
    margin = top2_margin(student_logits)  # also validates the shape
    n, device = student_logits.shape[0], student_logits.device
    u = torch.rand((), generator=generator).item()
    n_teacher = min(n, math.floor(budget * n + u))
    n_random = min(n_teacher, math.floor(random_floor * n + u))
    random = torch.zeros(n, dtype=torch.bool, device=device)
    random[torch.randperm(n, generator=generator)[:n_random].to(device)] = True
    if n_teacher == n:
        return Selection(teacher=torch.ones_like(random), random=random)
    # Random rows sort last, so the margin pick never takes them (n_teacher - n_random <= n - n_random).
    order = torch.argsort(margin.masked_fill(random, math.inf), stable=True)
    teacher = random.clone()
    teacher[order[: n_teacher - n_random]] = True
    return Selection(teacher=teacher, random=random)


def _rows_for(selection: Selection, teacher_logits: torch.Tensor) -> torch.Tensor:
    """The random rows of ``teacher_logits``, given for all N samples or only for the M teacher samples."""
    n = selection.teacher.shape[0]
    m = int(selection.teacher.sum())
    if teacher_logits.shape[0] == n:
        return teacher_logits[selection.random]
    if teacher_logits.shape[0] == m:
        return teacher_logits[selection.random_in_teacher]
    raise ValueError(f"teacher_logits has {teacher_logits.shape[0]} rows; expected {n} (all) or {m} (teacher)")


@torch.no_grad()
def random_agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     selection: Selection) -> torch.Tensor:
    """Per-sample top-1 agreement on the random share: bool R (R = random samples with finite teacher logits).

    ``student_logits`` float N x K; ``teacher_logits`` float N x K or M x K (only the teacher samples, in
    batch order, as the teacher returns them for ``images[selection.teacher]``). Its mean is an unbiased
    estimate of the student/teacher agreement on the stream; the margin-chosen samples are left out.
    """
    t = _rows_for(selection, teacher_logits).detach()
    s = student_logits.detach()[selection.random]
    finite = torch.isfinite(t).all(dim=1)
    return s[finite].argmax(1) == t[finite].argmax(1)


@torch.no_grad()
def random_correct(student_logits: torch.Tensor, labels: torch.Tensor, selection: Selection) -> torch.Tensor:
    """Per-sample correctness on the labelled part of the random share: bool L.

    ``labels`` int64 N, -1 where a sample has no label. Its mean is an unbiased accuracy estimate.
    """
    y = labels[selection.random]
    pred = student_logits.detach()[selection.random].argmax(1)
    return pred[y >= 0] == y[y >= 0]


class BudgetController:
    """Adaptive teacher budget in [floor, ceiling], updated once per batch.

    The controller follows the random-share agreement with two running means (each a plain mean over its
    first ``1 / weight`` observations, then an exponential average): a *fast* one (``fast``, the recent
    level) and a *slow* one (``slow``, the level the student has held). Each :meth:`update`:

    - drift: the budget jumps to the ceiling and both means restart (the old level no longer describes the
      stream);
    - the recent agreement fell more than ``drop`` below the held level, or below ``target_agreement`` when
      one is set: the budget rises by a factor ``(1 - step) ** -raise_rate`` (faster than it falls: a student
      that disagrees costs more than an extra teacher call);
    - otherwise it falls by a factor ``1 - step``: a student that keeps its level needs fewer labels;
    - no agreement this batch (``None``, an empty random share): unchanged.

    The rule is relative, so it fits any student: a small student that plateaus at 0.85 agreement is as
    "settled" as a large one at 0.97. ``target_agreement`` adds an absolute level below which the teacher
    keeps labelling more. The budget starts at the ceiling: a student of unknown quality gets the full
    teacher.
    """

    def __init__(self, floor: float = 0.1, ceiling: float = 1.0, target_agreement: float | None = None,
                 step: float = 0.05, *, drop: float = 0.05, fast: float = 0.02, slow: float = 0.002,
                 raise_rate: float = 2.0):
        if not 0.0 < floor <= ceiling <= 1.0:
            raise ValueError(f"need 0 < floor <= ceiling <= 1, got floor={floor} ceiling={ceiling}")
        if target_agreement is not None and not 0.0 < target_agreement <= 1.0:
            raise ValueError(f"target_agreement must be in (0, 1] or None, got {target_agreement}")
        if not 0.0 < step < 1.0:
            raise ValueError(f"step must be in (0, 1), got {step}")
        if not 0.0 <= drop < 1.0:
            raise ValueError(f"drop must be in [0, 1), got {drop}")
        if not 0.0 < slow <= fast <= 1.0:
            raise ValueError(f"need 0 < slow <= fast <= 1, got fast={fast} slow={slow}")
        if not raise_rate > 0.0:
            raise ValueError(f"raise_rate must be > 0, got {raise_rate}")
        self.floor, self.ceiling = float(floor), float(ceiling)
        self.target = None if target_agreement is None else float(target_agreement)
        self.step, self.drop, self.raise_rate = float(step), float(drop), float(raise_rate)
        self.fast_weight, self.slow_weight = float(fast), float(slow)
        self.budget = self.ceiling
        self.agreement: float | None = None  # recent agreement on the random share (fast mean)
        self.held: float | None = None  # the level the student has held (slow mean)
        self.observations = 0  # since the last drift

    def update(self, random_agreement: float | None, drift: bool = False) -> float:
        """Fold in one batch's random-share agreement (0-1, or None) and a drift flag; return the new budget."""
        if drift:
            self.budget = self.ceiling
            self.agreement, self.held, self.observations = None, None, 0
        if random_agreement is None or not math.isfinite(random_agreement):
            return self.budget
        self.observations += 1
        a = float(random_agreement)
        self.agreement = _running(self.agreement, a, max(self.fast_weight, 1.0 / self.observations))
        self.held = _running(self.held, a, max(self.slow_weight, 1.0 / self.observations))
        if drift:
            return self.budget
        if self.fell():
            self.budget = min(self.ceiling, self.budget * (1.0 - self.step) ** -self.raise_rate)
        else:
            self.budget = max(self.floor, self.budget * (1.0 - self.step))
        return self.budget

    def fell(self) -> bool:
        """The recent agreement is clearly below the held level (or below the absolute target)."""
        if self.agreement is None or self.held is None:
            return False
        return self.agreement < self.held - self.drop or (self.target is not None and self.agreement < self.target)

    def state_dict(self) -> dict:
        """Plain numbers (safe for ``torch.load(weights_only=True)`` and JSON)."""
        return {"budget": self.budget, "agreement": self.agreement, "held": self.held,
                "observations": self.observations}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; the budget is clamped into this controller's [floor, ceiling]."""
        budget = float(state["budget"])
        if not math.isfinite(budget):
            raise ValueError(f"budget state is not finite: {budget}")
        self.budget = min(self.ceiling, max(self.floor, budget))
        agreement, held = state.get("agreement"), state.get("held", state.get("agreement"))
        self.agreement = None if agreement is None else float(agreement)
        self.held = None if held is None else float(held)
        self.observations = max(0, int(state.get("observations", 0)))


def _running(mean: float | None, x: float, weight: float) -> float:
    return x if mean is None else mean + weight * (x - mean)
