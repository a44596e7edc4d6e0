"""The teacher budget: which samples of a batch the teacher labels, and how large that share is.

The student scores every incoming sample (forward only). :func:`select` sends a share of the batch to the
teacher: a uniformly random part (the *random share*) plus the least certain of the rest by the student's
top-2 softmax margin. Samples not sent are not trained on. Only the random share is an unbiased sample of
the stream, so agreement and accuracy estimates come from it alone (:func:`random_agreement`,
:func:`random_correct`); the margin-chosen samples are the hard ones and would bias them low.

:class:`BudgetController` adapts the budget between a floor and a ceiling: up when the student's agreement
on the random share is below target or drift is detected, down while the student agrees.

Configuration keys (proposed, section ``teacher``):

- ``teacher.budget``: fraction of samples sent to the teacher, a float in (0, 1], or ``"adaptive"``
  (:class:`BudgetController`). Default 1.0 (every sample, the loop without a budget).
- ``teacher.budget_floor``: lowest adaptive budget. Default 0.1.
- ``teacher.budget_ceiling``: highest adaptive budget (and the budget right after a drift). Default 1.0.
- ``teacher.random_share``: fraction of every batch sent to the teacher uniformly at random, for the
  unbiased estimates and the drift detector. Default 0.1. When the budget is below it, everything sent is
  random.
- ``teacher.target_agreement``: the adaptive budget rises while the smoothed agreement on the random
  share is below this. Default 0.9.
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

    The controller smooths the random-share agreement (a running mean over the first ``1 / smoothing``
    observations, then an exponential average with weight ``smoothing``). Each :meth:`update`:

    - drift: the budget jumps to the ceiling and the smoothed agreement restarts (the old level no longer
      describes the stream);
    - smoothed agreement below ``target_agreement``: the budget rises by a factor ``(1 - step) ** -raise_rate``
      (faster than it falls: a student that disagrees costs more than an extra teacher call);
    - otherwise it falls by a factor ``1 - step``;
    - no agreement this batch (``None``, an empty random share): unchanged.

    The budget starts at the ceiling: a student of unknown quality gets the full teacher.
    """

    def __init__(self, floor: float = 0.1, ceiling: float = 1.0, target_agreement: float = 0.9,
                 step: float = 0.05, *, smoothing: float = 0.05, raise_rate: float = 2.0):
        if not 0.0 < floor <= ceiling <= 1.0:
            raise ValueError(f"need 0 < floor <= ceiling <= 1, got floor={floor} ceiling={ceiling}")
        if not 0.0 < target_agreement <= 1.0:
            raise ValueError(f"target_agreement must be in (0, 1], got {target_agreement}")
        if not 0.0 < step < 1.0:
            raise ValueError(f"step must be in (0, 1), got {step}")
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        if not raise_rate > 0.0:
            raise ValueError(f"raise_rate must be > 0, got {raise_rate}")
        self.floor, self.ceiling, self.target = float(floor), float(ceiling), float(target_agreement)
        self.step, self.smoothing, self.raise_rate = float(step), float(smoothing), float(raise_rate)
        self.budget = self.ceiling
        self.agreement: float | None = None  # smoothed agreement on the random share
        self.observations = 0  # since the last drift

    def update(self, random_agreement: float | None, drift: bool = False) -> float:
        """Fold in one batch's random-share agreement (0-1, or None) and a drift flag; return the new budget."""
        if drift:
            self.budget = self.ceiling
            self.agreement, self.observations = None, 0
        if random_agreement is None or not math.isfinite(random_agreement):
            return self.budget
        self.observations += 1
        w = max(self.smoothing, 1.0 / self.observations)
        a = float(random_agreement)
        self.agreement = a if self.agreement is None else self.agreement + w * (a - self.agreement)
        if drift:
            return self.budget
        if self.agreement < self.target:
            self.budget = min(self.ceiling, self.budget * (1.0 - self.step) ** -self.raise_rate)
        else:
            self.budget = max(self.floor, self.budget * (1.0 - self.step))
        return self.budget

    def state_dict(self) -> dict:
        """Plain numbers (safe for ``torch.load(weights_only=True)`` and JSON)."""
        return {"budget": self.budget, "agreement": self.agreement, "observations": self.observations}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; the budget is clamped into this controller's [floor, ceiling]."""
        budget = float(state["budget"])
        if not math.isfinite(budget):
            raise ValueError(f"budget state is not finite: {budget}")
        self.budget = min(self.ceiling, max(self.floor, budget))
        agreement = state.get("agreement")
        self.agreement = None if agreement is None else float(agreement)
        self.observations = max(0, int(state.get("observations", 0)))
