"""Gated publishing: score each candidate snapshot on held-out stream samples before it goes live.

A stream can hurt the student (a bad teacher burst, corrupted inputs), and
whatever it is at snapshot time would otherwise be served. :class:`Holdout`
diverts a small random share of the stream into a reservoir that is never
trained on; :class:`Gate` accepts a candidate only if its holdout score is not
worse than the published snapshot's by more than a tolerance.

Compare like with like: the holdout's content changes as samples arrive
(``Holdout.revision`` counts the changes), so score the published weights
again when the revision in their score is not the current one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from .replay import ReplayBuffer, check_batch

__all__ = ["Gate", "Holdout", "Predictions"]

SCORE_BYTES = 64 << 20  # float32 model input per forward pass when the holdout is scored
_EPS = 1e-9  # scores are ratios of counts: absorb float rounding at exactly the tolerance


def _derived_seed(seed: int, stream: int) -> int:
    """An independent seed per random stream, so equal user seeds do not give correlated draws."""
    return int(np.random.SeedSequence([int(seed), stream]).generate_state(1, np.uint64)[0] >> 1)


class Holdout:
    """A reservoir of ``capacity`` teacher-labelled samples, fed by a ``share`` of the stream, never trained on.

    max_bytes optionally bounds the reservoir's memory as well (see :class:`ReplayBuffer`).
    """

    def __init__(self, capacity: int, share: float, seed: int, *, max_bytes: int | None = None) -> None:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"share must be in [0, 1], got {share!r}")
        self.share = float(share)
        self._gen = torch.Generator().manual_seed(_derived_seed(seed, 1))
        self._store = ReplayBuffer(capacity, max_bytes or sys.maxsize, 0.0, _derived_seed(seed, 2))
        self.offered = 0  # samples seen by offer()
        self.diverted = 0  # of which kept out of training

    def __len__(self) -> int:
        return len(self._store)

    @property
    def revision(self) -> int:
        """Changes to the held-out content so far."""
        return self._store.revision

    @property
    def nbytes(self) -> int:
        return self._store.nbytes

    def offer(self, images: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Divert a ``share`` of a batch (uint8 N×C×H×W, float logits N×K, int labels N) into the holdout.

        Returns keep_for_training: bool N on the CPU, False for every diverted sample (whether or not
        the reservoir keeps it), so no holdout sample is ever trained on.
        """
        check_batch(images, logits, labels)
        n = int(images.shape[0])
        divert = torch.rand(n, generator=self._gen) < self.share
        idx = torch.nonzero(divert).squeeze(1)
        if idx.numel():
            dev = idx.to(images.device)
            self._store.add(images.index_select(0, dev), logits.index_select(0, idx.to(logits.device)),
                            labels.index_select(0, idx.to(labels.device)))
        self.offered += n
        self.diverted += int(idx.numel())
        return ~divert

    @torch.inference_mode()
    def score(self, model: nn.Module, to_input: Callable[[torch.Tensor], torch.Tensor],
              batch_size: int | None = None, cache: Predictions | None = None) -> dict:
        """Score ``model`` on the holdout: to_input maps uint8 N×C×H×W (on the model's device) to its input.

        Returns ``agreement`` (top-1 match with the teacher), ``accuracy`` (over samples with a label,
        None without any), ``n``, ``labelled`` and the holdout ``revision``; agreement is None when the
        holdout is empty. The model runs in eval mode; its previous mode is restored.

        ``cache`` keeps this model's predictions per holdout slot between calls: only the samples
        written since the last call go through the model (the same weights must come with the same cache).
        ``batch_size``: samples per forward pass; by default as many as fit in ``SCORE_BYTES`` of float32
        input (the whole holdout of small images: one pass is cheaper than several).
        """
        slots, stamps = self._store.filled()
        n = int(slots.shape[0])
        out = {"agreement": None, "accuracy": None, "n": n, "labelled": 0, "revision": self.revision}
        if n == 0:
            return out
        cache = cache if cache is not None else Predictions()
        stale = cache.stale(slots, stamps)
        todo = slots[stale]
        if todo.numel():
            device = next(model.parameters(), torch.empty(0)).device
            was_training = model.training
            model.eval()
            try:
                images = self._store.slot_images(todo)
                if batch_size is None:
                    batch_size = max(1, SCORE_BYTES // (4 * images[0].numel()))
                pred = torch.cat([model(to_input(images[i:i + batch_size].to(device))).argmax(1).cpu()
                                  for i in range(0, int(todo.numel()), batch_size)])
            finally:
                model.train(was_training)
            cache.store(todo, stamps[stale], pred)
        pred = cache.pred[slots]
        teacher, labels = self._store.slot_targets(slots)
        has_label = labels >= 0
        labelled = int(has_label.sum())
        out.update(agreement=int((pred == teacher).sum()) / n, labelled=labelled,
                   accuracy=int(((pred == labels) & has_label).sum()) / labelled if labelled else None)
        return out

    # -- checkpoint state ------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Tensors and ints only (loads with ``torch.load(weights_only=True)``)."""
        return {"rng": self._gen.get_state(), "offered": self.offered, "diverted": self.diverted,
                "store": self._store.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        rng, store = state.get("rng"), state.get("store")
        if not isinstance(rng, torch.Tensor) or not isinstance(store, dict):
            raise ValueError("not a holdout state (needs 'rng' and 'store')")
        for k in ("offered", "diverted"):
            if isinstance(state.get(k), bool) or not isinstance(state.get(k), int) or state[k] < 0:
                raise ValueError(f"holdout state: {k} is not a non-negative integer")
        self._store.load_state_dict(store)
        self._gen.set_state(rng)
        self.offered, self.diverted = state["offered"], state["diverted"]


class Predictions:
    """One model's top-1 predictions per holdout slot, with the stamp of the sample each was made on."""

    def __init__(self) -> None:
        self.pred = torch.empty((0,), dtype=torch.int64)
        self.stamps = torch.empty((0,), dtype=torch.int64)

    def stale(self, slots: torch.Tensor, stamps: torch.Tensor) -> torch.Tensor:
        """bool per slot: no prediction yet, or made on a sample that has been replaced since."""
        size = int(slots.max()) + 1 if slots.numel() else 0
        if size > self.pred.numel():
            grow = size - self.pred.numel()
            self.pred = torch.cat([self.pred, torch.zeros(grow, dtype=torch.int64)])
            self.stamps = torch.cat([self.stamps, torch.full((grow,), -1, dtype=torch.int64)])
        return self.stamps[slots] != stamps

    def store(self, slots: torch.Tensor, stamps: torch.Tensor, pred: torch.Tensor) -> None:
        self.pred[slots] = pred.to(torch.int64)
        self.stamps[slots] = stamps


class Gate:
    """Accept a candidate unless its holdout score is worse than the published one by more than ``tolerance``.

    Agreement with the teacher is always compared; accuracy too when both scores have it.
    """

    def __init__(self, tolerance: float) -> None:
        if not 0.0 <= tolerance <= 1.0:
            raise ValueError(f"tolerance must be in [0, 1], got {tolerance!r}")
        self.tolerance = float(tolerance)

    def decide(self, candidate: dict, published: dict | None) -> tuple[bool, str]:
        """(accept, reason) for a candidate's :meth:`Holdout.score` against the published snapshot's."""
        if published is None:
            return True, "first snapshot"
        if candidate.get("agreement") is None or published.get("agreement") is None:
            return True, "no holdout score to compare"
        checks = [("agreement", candidate["agreement"], published["agreement"])]
        if candidate.get("accuracy") is not None and published.get("accuracy") is not None:
            checks.append(("accuracy", candidate["accuracy"], published["accuracy"]))
        parts = []
        for name, cand, pub in checks:
            if cand < pub - self.tolerance - _EPS:
                return False, (f"{name} {cand:.4f} < published {pub:.4f} - tolerance {self.tolerance:g} "
                               f"(n={candidate.get('n')})")
            parts.append(f"{name} {cand:.4f} vs published {pub:.4f}")
        return True, ", ".join(parts) + f" (tolerance {self.tolerance:g})"
