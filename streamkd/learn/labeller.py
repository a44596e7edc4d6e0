"""The labelling stage: which samples the teacher sees (the teacher budget), and its logits for them.

Its output, :class:`Labelled`, is the one seam between labelling (decode +
teacher) and training (student step + persistence): images with teacher
logits, labels, and which rows belong to the random share. A label worker on
another machine would publish exactly this.

With ``teacher.budget`` below 1 the student scores every sample first
(forward only) and the teacher labels the least certain ones by top-2 margin
plus a random share (``teacher.random_share``) chosen uniformly, so that
agreement estimates taken from the random share stay unbiased (budget.py).
Samples the teacher does not label are consumed but not trained on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from streamkd.learn.budget import BudgetController, Selection, select


@dataclass
class Labelled:
    """A batch with the teacher's answer: what the training stage consumes."""

    images: torch.Tensor  # uint8 M×C×H×W on the training device: the rows the teacher labelled
    teacher_logits: torch.Tensor  # float32 M×K
    labels: torch.Tensor  # int64 M, -1 where the record carried no label
    random: torch.Tensor  # bool M: rows of the random share (every row when the budget is 1)
    seen: int  # samples in the batch, labelled or not
    confidence: torch.Tensor | None  # the student's max softmax on all `seen` samples (budget < 1), else None
    batch: Any  # the ingest batch: the offsets it covers


MAX_SPREAD = 16  # records_per_step reads at most this many batches' worth of records per step


class TeacherBudget:
    """The share of samples sent to the teacher: fixed, or adaptive between a floor and a ceiling."""

    def __init__(self, budget: float | str, floor: float, ceiling: float, random_share: float,
                 target_agreement: float | None, seed: int, agreement_drop: float = 0.05):
        self.adaptive = budget == "adaptive"
        self.controller = BudgetController(floor, ceiling, target_agreement, drop=agreement_drop) \
            if self.adaptive else None
        self.fixed = None if self.adaptive else float(budget)
        self.random_share = random_share
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def value(self) -> float:
        return self.controller.budget if self.controller is not None else float(self.fixed)

    @property
    def active(self) -> bool:
        """False at a fixed budget of 1: every sample goes to the teacher without a selection pass."""
        return self.adaptive or self.value < 1.0

    def records_per_step(self, batch_size: int) -> int:
        """Records to read per step so that the teacher labels about ``batch_size`` of them at this budget.

        Each step then trains a full batch of fresh samples however low the budget, and the teacher sees
        full batches; the step count per record falls with the budget, which is where a low budget saves
        the training cost as well as the teacher's. At most ``MAX_SPREAD`` batches are read per step."""
        return min(batch_size * MAX_SPREAD, max(batch_size, round(batch_size / self.value)))

    def steps_per_batch(self, setting: int | str) -> int:
        """Training steps per labelled batch: ``setting``, or for ``"auto"`` round(1 / sqrt(budget)).

        ``auto`` gives 1 at the full budget and 2 at a quarter: reading ``1 / budget`` batches per step saves
        the teacher's cost and the student's alike, and the square root hands part of that saving back to
        the student as extra updates (fresh rows again, with new replayed samples), between one step per
        labelled batch and as many steps per record as the full budget trains."""
        if setting != "auto":
            return int(setting)
        return max(1, round(1.0 / math.sqrt(self.value)))

    def select(self, student_logits: torch.Tensor) -> Selection:
        return select(student_logits, self.value, self.random_share, self.generator)

    def update(self, random_agreement: float | None, drift: bool) -> None:
        if self.controller is not None:
            self.controller.update(random_agreement, drift)

    def state_dict(self) -> dict:
        return {"controller": self.controller.state_dict() if self.controller else {},
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if self.controller is not None and state.get("controller"):
            self.controller.load_state_dict(state["controller"])
        if isinstance(state.get("generator"), torch.Tensor):
            self.generator.set_state(state["generator"])


class Labeller:
    """Teacher logits for a batch; with a budget, only for the samples the student is least sure of."""

    def __init__(self, teacher: Callable[[torch.Tensor], torch.Tensor], budget: TeacherBudget,
                 student_logits: Callable[[torch.Tensor], torch.Tensor]):
        self.teacher, self.budget, self.student_logits = teacher, budget, student_logits

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, batch: Any = None) -> Labelled:
        """images uint8 N×C×H×W and labels int64 N, on the training device."""
        n = int(images.shape[0])
        if not self.budget.active:
            return Labelled(images, self.teacher(images), labels, torch.ones(n, dtype=torch.bool,
                            device=images.device), n, None, batch)
        scores = self.student_logits(images)
        sel = self.budget.select(scores)
        rows = sel.teacher
        x = images[rows]
        logits = self.teacher(x) if x.shape[0] else scores[:0].float()  # no row chosen: no teacher call
        return Labelled(x, logits, labels[rows], sel.random[rows], n, scores.softmax(1).amax(1), batch)
