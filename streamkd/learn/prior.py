"""Per-row loss weights that give each step the stream's long-run class mix (``replay.reweight``).

A step trains on the fresh batch, which follows the stream's *current* class mix, plus samples replayed
from the buffer, which mostly follow its *long-run* mix. When the mix moves (classes that arrive in turn,
a class that goes quiet for a while, a camera that sees one kind of object for an hour), the fresh rows
bring the current classes in far above their long-run share, and the student learns them at the cost of
the others: the recency bias of online continual learning. Replay alone only dilutes it.

The correction is importance weighting for label shift (Saerens et al. 2002; Lipton et al. 2018,
"Detecting and Correcting for Label Shift with Black Box Predictors"): a row of class c gets the weight
``s(c) / q(c)``, the class's long-run share over its expected share in the step, so that in expectation
the step's loss is the loss on the long-run mix. The classes are the teacher's top-1 (a stream rarely
carries labels). With f fresh rows of n, and a share ρ of the replayed ones from the buffer's recent
region:

* ``s``: the class shares over every sample the teacher labelled for training so far, this step's
  included (what the buffer's reservoir holds, being a uniform sample of them);
* ``r``: the class shares over about the last ``window`` samples *before* this step (a moving average;
  50 samples per class, at least ``RECENT_WINDOW``), the expected mix of the fresh rows; the step's own
  rows are left out so that they do not weigh themselves down;
* ``q = (f·r + (n − f)·((1 − ρ)·s + ρ·r)) / n``, the expected mix of the step;
* the weights are scaled to average 1 over the step, so the learning rate keeps its meaning.

On a stream whose mix does not move, ``r ≈ s``, so ``q ≈ s`` and every weight is about 1 (weighting by
each step's own class counts would add noise there). No weight exceeds ``n / ((n − f)(1 − ρ))`` before
the scaling, because ``q ≥ (n − f)(1 − ρ)/n · s``. The model of ``q`` is the buffer's plain one: the ring
holds the latest ``recency_share × capacity`` samples, not ``window``, and prioritized draws lean to the
samples the student gets wrong, so ``q`` is an approximation; with ``replay.balance`` the reservoir's draws
are balanced by other means, and the configuration refuses the two together. At a teacher budget below 1
the shares are those of the samples the teacher labels (which lean to the ones the student is unsure of).

The state lives on the training device (no copy to the host per step) and goes into the checkpoint.
"""

from __future__ import annotations

import torch

from .replay import RECENT_WINDOW

__all__ = ["ClassPrior", "recent_window"]

PER_CLASS = 50  # samples per class in the recent window: its shares are then within about 15 % of the truth


def recent_window(num_classes: int) -> int:
    """Samples the recent shares average over: ``RECENT_WINDOW``, more with many classes."""
    return max(RECENT_WINDOW, PER_CLASS * int(num_classes))


class ClassPrior:
    """The stream's long-run and recent class shares (by teacher top-1), and the step weights they give."""

    def __init__(self) -> None:
        self._counts: torch.Tensor | None = None  # float64 K: samples per class so far (this step's included)
        self._recent: torch.Tensor | None = None  # float64 K: class shares over the window before this step
        self._last: torch.Tensor | None = None  # float64 K: this step's counts, not yet in the recent shares

    @property
    def num_classes(self) -> int:
        return 0 if self._counts is None else int(self._counts.numel())

    def observe(self, top1: torch.Tensor, num_classes: int, valid: torch.Tensor | None = None) -> None:
        """Count a step's fresh samples: ``top1`` int N, their teacher's top-1 classes in [0, num_classes);
        ``valid``: bool N, the rows to count (rows with non-finite teacher logits are not trained on)."""
        if not top1.numel():
            return
        if valid is not None:  # invalid rows go to an extra bin that is dropped: no data-dependent shape
            top1 = top1.masked_fill(~valid, num_classes)
        # index_add_, not bincount: bincount reads the largest class on the host to size its result (a sync on CUDA)
        hist = torch.zeros(num_classes + 1, dtype=torch.float64, device=top1.device).index_add_(
            0, top1, torch.ones(top1.shape, dtype=torch.float64, device=top1.device))[:num_classes]
        if self._counts is None or self._counts.numel() != num_classes:
            self._counts, self._recent, self._last = hist.clone(), None, hist
            return
        if self._last is not None:
            self._fold_last()
        self._counts += hist
        self._last = hist

    def _fold_last(self) -> None:
        """Move the previous step's counts into the recent shares."""
        last = self._last
        assert last is not None
        n = last.sum().clamp(min=1.0)
        keep = (1.0 - 1.0 / recent_window(last.numel())) ** n
        shares = last / n
        self._recent = shares if self._recent is None else self._recent * keep + shares * (1.0 - keep)

    def weights(self, top1: torch.Tensor, stream_rows: int, ring_share: float) -> torch.Tensor | None:
        """float32 weights (mean 1, on ``top1``'s device) for a step's rows: ``top1`` int N, the rows' teacher
        top-1 classes, the first ``stream_rows`` of them from the stream and the rest replayed, a
        ``ring_share`` of those from the buffer's recent region. None before any sample was observed."""
        if self._counts is None:
            return None
        n = int(top1.shape[0])
        s = self._counts / self._counts.sum().clamp(min=1.0)
        r = s if self._recent is None else self._recent  # the first step: no earlier samples
        q = (stream_rows * r + (n - stream_rows) * ((1.0 - ring_share) * s + ring_share * r)) / n
        table = (s / q.clamp(min=1e-12)).to(torch.float32)
        w = table[top1]
        return w * (n / w.sum().clamp(min=1e-12))

    def seed(self, counts: torch.Tensor, recent: torch.Tensor | None) -> None:
        """Start from estimated class counts (float K) and recent shares (float K, or None: the counts' shares),
        e.g. the replay buffer's content when a checkpoint has no prior of its own."""
        self._counts = counts.detach().to(torch.float64).clone()
        self._recent = (self._counts / self._counts.sum().clamp(min=1.0) if recent is None
                        else recent.detach().to(self._counts.device, torch.float64).clone())
        self._last = None

    def state_dict(self) -> dict:
        if self._counts is None:
            return {}
        out = {"counts": self._counts.cpu(), "last": self._last.cpu() if self._last is not None else None}
        if self._recent is not None:
            out["recent"] = self._recent.cpu()
        return out

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        counts, recent, last = state.get("counts"), state.get("recent"), state.get("last")
        if counts is None:
            self._counts = self._recent = self._last = None
            return
        for name, t in (("counts", counts), ("recent", recent), ("last", last)):
            if t is None and name != "counts":
                continue
            if not (isinstance(t, torch.Tensor) and t.dim() == 1 and t.shape == counts.shape):
                raise ValueError(f"class prior state: {name} must be a tensor of the counts' shape (K,)")
            if not (bool(torch.isfinite(t).all()) and bool((t >= 0).all())):
                raise ValueError(f"class prior state: {name} must be finite and >= 0")
        self._counts = counts.to(device, torch.float64).clone()
        self._recent = None if recent is None else recent.to(device, torch.float64).clone()
        self._last = None if last is None else last.to(device, torch.float64).clone()
