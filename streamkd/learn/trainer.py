"""The training stage: what each step trains on, the weights a snapshot serves, and the reaction to drift.

One :meth:`Trainer.step` per labelled batch:

1. a small share of the fresh samples goes to the holdout (never trained on; it scores snapshots);
2. the rest, plus replayed samples from the buffer (``replay.ratio`` per sample of a full batch, so that
   steps stay useful when the teacher budget leaves few fresh samples; drawn by priority, see
   ``replay.priority``), make the step's batch; only fresh rows count for the prequential figures and
   ``samples_seen``; the replayed rows' divergence from the teacher becomes their new priority; each row's
   loss is weighted so that the step's class mix is the stream's long-run one (``replay.reweight``,
   learn/prior.py);
3. the EMA of the student is updated;
4. the fresh samples enter the replay buffer, each with its divergence as its priority;
5. the drift monitor reads the random share's agreement and the student's confidence; on a detection the
   budget goes to its ceiling and the replay buffer keeps its older content when ``drift.protect_samples``
   is set. After an input shift (any drift, with ``drift.boost_on: all``) the learning rate is also raised
   for a while, each batch then gets ``drift.boost_updates`` updates (after an input shift the extra ones
   replay mostly the latest samples, ``drift.boost_recent_share``), and the served EMA follows the student closely for a
   while (``drift.ema_decay``, ``drift.ema_steps``).

Every piece can be switched off (``replay.enabled``, ``ema.enabled``, ``gate.enabled``, ``drift.enabled``);
with all off this is the plain online KD step.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import torch

from streamkd.config import Config
from streamkd.learn.drift import DriftMonitor, LrBoost
from streamkd.learn.ema import Ema, unwrap
from streamkd.learn.gate import Gate, Holdout, Predictions
from streamkd.learn.labeller import Labelled, TeacherBudget
from streamkd.learn.learner import Learner, S
from streamkd.learn.prior import ClassPrior
from streamkd.learn.replay import ReplayBuffer
from streamkd.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    """A snapshot the gate has looked at."""

    weights: dict[str, torch.Tensor]  # CPU copies: the EMA's when enabled, else the student's
    which: str  # "ema" | "student"
    accepted: bool
    reason: str
    score: dict | None  # the candidate on the holdout
    published_score: dict | None  # the last published snapshot on the same holdout
    predictions: Predictions | None = None  # the candidate's holdout predictions (reused once it is published)


class Trainer:
    def __init__(self, cfg: Config, learner: Learner, budget: TeacherBudget, metrics: Metrics):
        self.cfg, self.learner, self.budget, self.metrics = cfg, learner, budget, metrics
        seed = cfg.train.seed
        r, g, d = cfg.replay, cfg.gate, cfg.drift
        self.replay = ReplayBuffer(r.capacity, r.max_bytes, r.recency_share, seed, r.balance,
                                   r.priority) if r.enabled else None
        self.prior = ClassPrior() if r.enabled and r.reweight else None
        self.ema = Ema(learner.student, cfg.ema.decay) if cfg.ema.enabled else None
        self.holdout = Holdout(g.holdout_capacity, g.holdout_share, seed) if g.enabled else None
        self.gate = Gate(g.tolerance)
        self.drift = DriftMonitor(d.detector) if d.enabled else None
        self.boost = LrBoost(d.lr_boost, d.boost_steps)
        self.drifts = 0
        self.boost_kind: str | None = None  # the kind of drift that started the boost
        self.last_drift: dict | None = None
        self.rejections = 0
        self.last_rejection: dict | None = None
        self.held_out = 0  # samples of the last batch that went to the holdout instead of training
        self.force_next = False  # an operator asked to publish the next snapshot whatever the gate says
        self._published: dict[str, torch.Tensor] | None = None  # the weights LATEST serves (gate reference)
        self._scratch: torch.nn.Module | None = None  # a model to score published weights with
        self._scratch_holds: dict[str, torch.Tensor] | None = None  # the weights loaded into it
        self._published_preds = Predictions()  # the published weights' holdout predictions, per slot

    # -- one step ----------------------------------------------------------------------------------
    def step(self, lab: Labelled) -> torch.Tensor | None:
        """Train on a labelled batch; returns the learner's stats (device), or None if nothing was trained.

        At a teacher budget below 1 the batch gets ``train.steps_per_batch`` updates (while a drift boost
        lasts, at least ``drift.boost_updates``): the first one scores and counts the fresh rows, the others
        train them again with a new draw of replayed samples (while a boost after an input shift lasts, a
        ``drift.boost_recent_share`` of it from the buffer's latest samples)."""
        self.metrics.teacher_called(int(lab.images.shape[0]), self.budget.value)
        x, t, y, random = lab.images, lab.teacher_logits, lab.labels, lab.random
        self.held_out = 0
        if self.holdout is not None and x.shape[0]:
            diverted = self.holdout.diverted
            keep = self.holdout.offer(x, t, y)
            self.held_out = self.holdout.diverted - diverted
            if self.held_out:  # most batches lose nothing to the holdout: no copies then
                keep = keep.to(x.device)
                x, t, y, random = x[keep], t[keep], y[keep], random[keep]
        fresh = int(x.shape[0])
        top1 = None  # the teacher's classes of the fresh rows, where something reads them
        if self.prior is not None:
            top1 = t.argmax(1)
            self.prior.observe(top1, int(t.shape[1]), torch.isfinite(t).all(1))
        batch = self._with_replay(x, t, y, top1)
        if batch is None:
            return None
        stats = self._learn(*batch, fresh=fresh)
        if self.ema is not None:
            self.ema.update(self.learner.student)
        if self.replay is not None and fresh:
            self.replay.add(x, t, y, self.learner.last_divergence[:fresh] if self.replay.priority else None)
            self.metrics.replay_buffer(len(self.replay), self.replay.nbytes)
        self._watch(lab, t, top1, random, fresh)
        recent = self.cfg.drift.boost_recent_share if self._boosting("input_shift") else None
        for _ in range(self._updates() - 1):
            again = self._learn(*self._with_replay(x, t, y, top1, recent), fresh=0)
            stats[S["skipped"]] = torch.maximum(stats[S["skipped"]], again[S["skipped"]])
            if self.ema is not None:
                self.ema.update(self.learner.student)
        self.learner.lr_scale = self.boost.step()
        return stats

    def _learn(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, slots: torch.Tensor | None,
               weight: torch.Tensor | None, *, fresh: int) -> torch.Tensor:
        """One learner step on rows ``x`` (the replayed ones last, from ``slots``; ``weight``: each row's weight in
        the loss); their divergence from the teacher, measured by the step, becomes the replayed slots' priority."""
        stats = self.learner.step(x, t, y, fresh=fresh, weight=weight)
        if slots is not None and self.replay is not None and self.replay.priority:
            self.replay.reprioritize(slots, self.learner.last_divergence[x.shape[0] - slots.shape[0]:])
        return stats

    def _boosting(self, kind: str) -> bool:
        """True while a boost started by a drift of ``kind`` lasts."""
        return self.boost.remaining > 0 and self.boost_kind == kind

    def _updates(self) -> int:
        """Updates for this labelled batch: ``train.steps_per_batch``, at least ``drift.boost_updates`` while
        a drift boost lasts."""
        n = self.budget.steps_per_batch(self.cfg.train.steps_per_batch)
        return max(n, self.cfg.drift.boost_updates) if self.boost.remaining > 0 else n

    def _with_replay(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, top1: torch.Tensor | None,
                     recent: float | None = None):
        """(images, logits, labels, slots, weights): the fresh rows plus a draw from the replay buffer
        (``recent``: the share of it from the latest samples, ``replay.recency_share`` when None), the drawn
        slots last (None without a draw), and the rows' loss weights (``replay.reweight``, from ``top1``, the
        fresh rows' teacher classes; None: all 1); or None when there is nothing to train."""
        if self.replay is None:
            return (x, t, y, None, None) if x.shape[0] else None
        # The holdout's rows are made up from the buffer: a step's shape does not depend on the gate.
        n = round(self.cfg.replay.ratio * self.cfg.train.batch_size) + self.held_out
        replayed = self.replay.sample(n, int(x.shape[0]), recent)
        if replayed is None:
            return (x, t, y, None, None) if x.shape[0] else None
        rx, rt, ry = (v.to(x.device, non_blocking=True) for v in replayed[:3])
        self.metrics.replayed(int(rx.shape[0]))
        weight = None if self.prior is None or top1 is None else \
            self.prior.weights(torch.cat([top1, rt.argmax(1)]), int(x.shape[0]), self.replay.ring_share(recent))
        return torch.cat([x, rx]), torch.cat([t, rt.to(t.dtype)]), torch.cat([y, ry]), replayed.slots, weight

    def _watch(self, lab: Labelled, t: torch.Tensor, top1: torch.Tensor | None, random: torch.Tensor,
               fresh: int) -> None:
        """Random-share agreement -> budget controller and drift monitor (a host read of a few values). ``t``:
        the fresh rows' teacher logits; ``top1``: their classes when the step has them already.

        At a fixed full budget with drift off nothing reads it (the prequential agreement covers every
        sample), so the plain step keeps no per-step host sync."""
        if not fresh or (self.drift is None and not self.budget.active):
            return
        # One copy to the host; a few dozen values are cheaper to compare in Python than with more tensor ops.
        classes = t.argmax(1) if top1 is None else top1
        pred, top1, random = torch.stack([self.learner.last_pred, classes, random.long()]).tolist()
        agree = [float(p == c) for p, c, r in zip(pred, top1, random, strict=True) if r]
        random_agreement = sum(agree) / len(agree) if agree else None
        if random_agreement is not None:
            self.metrics.random_agreement(random_agreement)
        event = None
        if self.drift is not None:
            confidence = lab.confidence if lab.confidence is not None else self.learner.last_confidence
            event = self.drift.update(agree, confidence.float().cpu().tolist(), top1)
        self.budget.update(random_agreement, drift=event is not None)
        if event is not None:
            self.on_drift(event.as_dict())

    def on_drift(self, event: dict) -> None:
        """React to a detection (the budget controller has already seen it): after an input shift (any drift
        with ``drift.boost_on: all``), boost the learning rate and the updates, and let the served EMA follow."""
        self.drifts += 1
        self.last_drift = {**event, "at": time.time(), "budget_after": self.budget.value}
        kind = event.get("kind", "input_shift")
        if kind == "input_shift" or self.cfg.drift.boost_on == "all":
            self.boost.trigger()
            self.boost_kind = kind
            if self.ema is not None:
                self.ema.follow(self.cfg.drift.ema_decay, self.cfg.drift.ema_steps)
        if self.replay is not None:
            self.replay.protect(self.cfg.drift.protect_samples)
        self.metrics.drift_detected.inc()
        log.warning("drift detected (%s) on %s after %d samples: mean %.3f -> %.3f; budget %.2f, lr x%.1f, EMA "
                    "decay %s", event.get("kind"), event.get("signal"), event.get("samples_seen", 0),
                    event.get("mean_before") or float("nan"), event.get("mean_after") or float("nan"),
                    self.budget.value, self.boost.multiplier,
                    f"{self.ema.current_decay():.3f}" if self.ema is not None else "-",
                    extra={"fields": {"event": "drift", **event}})

    # -- snapshots ---------------------------------------------------------------------------------
    def candidate(self) -> Candidate:
        """The weights a snapshot would serve now, and the gate's verdict on them."""
        which = "ema" if self.ema is not None else "student"
        weights = self.ema.weights() if self.ema is not None else self.learner.weights()
        force, self.force_next = self.force_next, False
        if self.holdout is None or not len(self.holdout):
            reason = "no holdout yet" if self.holdout is not None else "gate off"  # an empty Holdout is falsy
            return Candidate(weights, which, True, reason, None, None)
        model = self.ema.module if self.ema is not None else unwrap(self.learner.student)
        preds = Predictions()
        score, published, accepted, reason = self.judge(model, preds)
        if force and not accepted:
            accepted, reason = True, f"forced by an operator ({reason})"
        if not accepted:
            self.rejections += 1
            self.last_rejection = {"at": time.time(), "candidate": score, "published": published, "reason": reason}
            self.metrics.gate_rejections.inc()
            log.warning("snapshot gate: candidate rejected (%s); candidate %s, published %s", reason,
                        _brief(score), _brief(published))
        return Candidate(weights, which, accepted, reason, score, published, preds)

    def judge(self, model: torch.nn.Module, preds: Predictions) -> tuple[dict, dict | None, bool, str]:
        """The gate's work on a candidate: ``model`` and the published weights scored on the holdout (the
        candidate's predictions kept in ``preds``), and the verdict: (score, published score, accept, reason)."""
        score = self.holdout.score(model, self.learner.model_input, cache=preds)
        published = self._score_published()
        return score, published, *self.gate.decide(score, published)

    def published(self, weights: dict[str, torch.Tensor], predictions: Predictions | None = None) -> None:
        """``weights`` are now what LATEST serves (the gate compares the next candidates with them).

        ``predictions``: theirs on the holdout, when the candidate's scoring just made them."""
        self._published = weights
        self._published_preds = predictions if predictions is not None else Predictions()

    def _score_published(self) -> dict | None:
        if self._published is None:
            return None
        if self._scratch is None:
            self._scratch = copy.deepcopy(unwrap(self.learner.student))
        if self._scratch_holds is not self._published:  # loaded once per published snapshot
            self._scratch.load_state_dict(self._published)
            self._scratch_holds = self._published
        return self.holdout.score(self._scratch, self.learner.model_input, cache=self._published_preds)

    def manifest(self) -> dict:
        """What a snapshot's manifest records about learning: budget, replay, gate and drift."""
        return {
            "teacher_budget": self.budget.value,
            "replay": {"samples": len(self.replay), "bytes": self.replay.nbytes} if self.replay else None,
            "gate": {"enabled": self.holdout is not None, "tolerance": self.cfg.gate.tolerance,
                     "rejections": self.rejections, "last_rejection": self.last_rejection},
            "drift": {"detected": self.drifts, "last": self.last_drift},
        }

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        out: dict = {"budget": self.budget.state_dict(), "boost": self.boost.state_dict(),
                     "boost_kind": self.boost_kind, "drifts": self.drifts, "rejections": self.rejections}
        if self.drift is not None:
            out["drift"] = self.drift.state_dict()
        if self.replay is not None:
            out["replay"] = self.replay.state_dict()
        if self.prior is not None:
            out["prior"] = self.prior.state_dict()
        if self.ema is not None:
            out["ema"] = self.ema.state_dict()
        if self.holdout is not None:
            out["holdout"] = self.holdout.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        self.budget.load_state_dict(state.get("budget", {}))
        if state.get("boost"):
            self.boost.load_state_dict(state["boost"])
        kind = state.get("boost_kind")
        self.boost_kind = kind if isinstance(kind, str) else None
        self.drifts = int(state.get("drifts", 0))
        if self.drift is not None and state.get("drift"):
            self.drift.load_state_dict(state["drift"])
        self.rejections = int(state.get("rejections", 0))
        for name in ("replay", "ema", "holdout"):
            part = getattr(self, name)
            if part is not None and name in state:
                part.load_state_dict(state[name])
        if self.prior is not None:
            self._load_prior(state.get("prior") or {})
        if self.ema is not None and "ema" not in state:  # a checkpoint from before the EMA: start it here
            self.ema = Ema(self.learner.student, self.cfg.ema.decay)
        self.learner.lr_scale = self.boost.multiplier

    def _load_prior(self, state: dict) -> None:
        """The class prior from the checkpoint; from the replay buffer's content when the checkpoint has none (one
        written without ``replay.reweight``): its reservoir is a uniform sample of the samples seen, its ring the
        latest ones. Starting from nothing would weigh every replayed class not seen since the restart at 0."""
        assert self.prior is not None
        if state.get("counts") is not None:
            self.prior.load_state_dict(state, self.learner.device)
            return
        held = self.replay.class_counts() if self.replay is not None else None
        if held is None:
            return
        reservoir, ring = held
        seen = max(self.replay.seen, 1)
        counts = reservoir * (seen / reservoir.sum()) if reservoir.sum() > 0 else ring * (seen / ring.sum())
        recent = ring / ring.sum() if ring.sum() > 0 else None
        self.prior.seed(counts.to(self.learner.device), None if recent is None else recent.to(self.learner.device))


def _brief(score: dict | None) -> str:
    if not score:
        return "-"
    acc = score.get("accuracy")
    return f"agreement {score['agreement']:.4f}" + (f", accuracy {acc:.4f}" if acc is not None else "") + \
        f" on {score['n']}"
