"""Per-row loss weights that give each step the stream's long-run class mix (``replay.reweight``).

A step trains on the fresh batch, which follows the stream's *current* class mix, plus samples replayed
from the buffer, which mostly follow its *long-run* mix. When the mix moves (classes that arrive in turn,
a class that goes quiet for a while, a camera that sees one kind of object for an hour), the fresh rows
bring the current classes in far above their long-run share, and the student learns them at the cost of
the others: the recency bias of online continual learning. Replay alone only dilutes it.

The correction is importance weighting for label shift (Saerens et al. 2002; Lipton et al. 2018,
"Detecting and Correcting for Label Shift with Black Box Predictors"): a row of class c gets the weight
``s(c) / q(c)``, the class's long-run share over its expected share in the step, so that in expectation
the step's loss is the loss on the stream's long-run mix. The classes are the teacher's top-1 (a stream
rarely carries labels). With f fresh rows of n, and a share ρ of the replayed ones from the buffer's
recent region:

* ``s``: the class shares over every fresh sample so far (what the buffer's reservoir holds, being a
  uniform sample of the stream);
* ``r``: the class shares over about the last ``RECENT_WINDOW`` samples (a moving average), which the
  fresh rows and the recent region follow;
* ``q = (f·r + (n − f)·((1 − ρ)·s + ρ·r)) / n``, the expected mix of the step;
* the weights are scaled to average 1 over the step, so the learning rate keeps its meaning.

On a stream whose mix does not move, ``r ≈ s``, so ``q ≈ s`` and every weight is about 1: the correction
adds no noise there (weighting by the step's own class counts would). No weight exceeds
``n / ((n − f)(1 − ρ))`` before scaling, because ``q ≥ (n − f)(1 − ρ)/n · s``.

The state (per-class counts and recent shares, float64 on the CPU) is small and goes into the checkpoint.
"""

from __future__ import annotations

import torch

from .replay import RECENT_WINDOW

__all__ = ["ClassPrior"]


class ClassPrior:
    """The stream's long-run and recent class shares (by teacher top-1), and the step weights they give."""

    def __init__(self) -> None:
        self._counts: torch.Tensor | None = None  # float64 K: fresh samples per class so far
        self._recent: torch.Tensor | None = None  # float64 K: class shares over about RECENT_WINDOW samples

    @property
    def seen(self) -> int:
        """Fresh samples observed so far."""
        return 0 if self._counts is None else int(self._counts.sum())

    def observe(self, top1: torch.Tensor, num_classes: int) -> None:
        """Count a step's fresh samples: ``top1`` int N, their teacher's top-1 classes in [0, num_classes)."""
        n = int(top1.shape[0])
        if n == 0:
            return
        hist = torch.bincount(top1.detach().to("cpu"), minlength=num_classes).to(torch.float64)
        if self._counts is None or self._counts.numel() != hist.numel():
            self._counts = torch.zeros_like(hist)
            self._recent = hist / n
        else:
            assert self._recent is not None
            keep = (1.0 - 1.0 / RECENT_WINDOW) ** n
            self._recent.mul_(keep).add_(hist / n, alpha=1.0 - keep)
        self._counts += hist

    def weights(self, top1: torch.Tensor, stream_rows: int, ring_share: float) -> torch.Tensor | None:
        """float32 weights (mean 1, on ``top1``'s device) for a step's rows: ``top1`` int N, the rows' teacher
        top-1 classes, the first ``stream_rows`` of them from the stream and the rest replayed, a
        ``ring_share`` of those from the buffer's recent region. None before any sample was observed."""
        if self._counts is None or not bool(self._counts.sum() > 0):
            return None
        assert self._recent is not None
        n = int(top1.shape[0])
        s = self._counts / self._counts.sum()
        q = (stream_rows * self._recent + (n - stream_rows) * ((1.0 - ring_share) * s + ring_share * self._recent)) / n
        table = (s / q.clamp(min=1e-12)).to(torch.float32).to(top1.device, non_blocking=True)
        w = table[top1]
        return w * (n / w.sum().clamp(min=1e-12))

    def state_dict(self) -> dict:
        if self._counts is None:
            return {}
        assert self._recent is not None
        return {"counts": self._counts.clone(), "recent": self._recent.clone()}

    def load_state_dict(self, state: dict) -> None:
        counts, recent = state.get("counts"), state.get("recent")
        if counts is None and recent is None:
            self._counts = self._recent = None
            return
        if not (isinstance(counts, torch.Tensor) and isinstance(recent, torch.Tensor) and counts.dim() == 1
                and counts.shape == recent.shape):
            raise ValueError("class prior state: counts and recent must be tensors of one shape (K,)")
        if not (bool(torch.isfinite(counts).all()) and bool(torch.isfinite(recent).all())
                and bool((counts >= 0).all()) and bool((recent >= 0).all())):
            raise ValueError("class prior state: counts and shares must be finite and >= 0")
        self._counts, self._recent = counts.to(torch.float64).clone(), recent.to(torch.float64).clone()
