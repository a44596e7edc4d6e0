"""Replay, EMA, the publishing gate, the teacher budget and drift handling, in the real loop (no broker)."""

from __future__ import annotations

import pytest
import torch
from test_loop import BATCH, MemoryIntake, batches, config, run

from streamkd import daemon
from streamkd.ingest.batcher import Batch
from streamkd.learn.labeller import MAX_SPREAD, TeacherBudget
from streamkd.state.checkpoint import CheckpointStore
from streamkd.state.snapshot import SnapshotStore


@pytest.mark.parametrize("priority", ["0", "1"])
def test_replay_ema_and_holdout_resume_from_the_checkpoint(tmp_path, priority):
    cfg = config(tmp_path, "checkpoint.every_steps=1000", "gate.holdout_share=0.1", f"replay.priority={priority}",
                 plain=False)
    first = daemon.build(cfg, intake=MemoryIntake(batches(10)))
    prog = run(first, 10 * BATCH)
    tr = first.trainer
    held = tr.holdout.diverted
    assert 0 < held < 10 * BATCH and tr.replay.seen == 10 * BATCH - held  # every trained sample was offered
    assert prog.samples_seen == 10 * BATCH  # trained + held out: each record of the lineage once
    assert first.registry.get_sample_value("streamkd_replayed_samples_total") > 0
    assert first.registry.get_sample_value("streamkd_replay_buffer_samples") == len(tr.replay)
    state = CheckpointStore(tmp_path / "ck").load_latest().learning

    again = daemon.build(cfg, intake=MemoryIntake([]))
    again.persistence.resume(again.accounting.prog)
    tr2 = again.trainer
    for a, b in zip(tr.replay.contents(), tr2.replay.contents(), strict=False):
        assert torch.equal(a, b)
    assert all(torch.equal(tr.ema.weights()[k], tr2.ema.weights()[k]) for k in tr.ema.weights())
    assert len(tr2.holdout) == len(tr.holdout) and tr2.holdout.diverted == held
    assert torch.equal(tr.replay._prio, tr2.replay._prio)  # the priorities too
    assert torch.equal(tr.replay.sample(16)[0], tr2.replay.sample(16)[0])  # the same future draws
    assert float(tr.prior.state_dict()["counts"].sum()) == tr.replay.seen  # every trained sample is counted
    assert all(torch.equal(v, tr2.prior.state_dict()[k]) for k, v in tr.prior.state_dict().items())
    assert set(state) >= {"replay", "prior", "ema", "holdout", "budget", "boost"}


def test_snapshots_serve_the_ema_weights_and_say_so(tmp_path):
    cfg = config(tmp_path, "snapshot.every_steps=4", "gate.enabled=false", plain=False)
    parts = daemon.build(cfg, intake=MemoryIntake(batches(8)))
    run(parts, 8 * BATCH)
    store = SnapshotStore(tmp_path / "sn")
    manifest = store.latest()
    assert manifest["weights"] == "ema"
    from safetensors.torch import load_file

    served = load_file(str(store.file_path(manifest["version"], "model.safetensors")))
    ema = parts.trainer.ema.weights()
    student = parts.learner.weights()
    assert all(torch.equal(served[k], ema[k]) for k in ema)
    assert any(not torch.equal(served[k], student[k]) for k in student)


def gated(tmp_path, *extra):
    cfg = config(tmp_path, "snapshot.every_steps=1000", "ema.enabled=false", "gate.holdout_share=0.5",
                 "gate.tolerance=0.01", *extra, plain=False)
    parts = daemon.build(cfg, intake=MemoryIntake(batches(12)))
    prog = run(parts, 12 * BATCH)  # publishes snapshot 1 at the stop
    assert SnapshotStore(tmp_path / "sn").versions() == [1]
    return parts, prog


def test_rows_taken_by_the_holdout_are_made_up_from_the_replay_buffer(tmp_path):
    """A step trains on as many rows with the gate as without it: its shape does not depend on the holdout."""
    cfg = config(tmp_path, "snapshot.every_steps=1000", "gate.holdout_share=0.25", plain=False)
    parts = daemon.build(cfg, intake=MemoryIntake(batches(12)))
    rows, real = [], parts.learner.step
    parts.learner.step = lambda x, *a, **k: (rows.append(int(x.shape[0])), real(x, *a, **k))[1]
    run(parts, 12 * BATCH)
    assert parts.trainer.holdout is not None and len(parts.trainer.holdout) > 12  # about a quarter held out
    assert rows[0] < BATCH  # the first step has no buffer to draw from
    replayed = round(parts.cfg.replay.ratio * BATCH)  # replay.ratio replayed rows per row of a full batch
    assert rows[1:] == [BATCH + replayed] * 11


def test_a_candidate_before_any_held_out_sample_is_accepted_as_such(tmp_path):
    cfg = config(tmp_path, "snapshot.every_steps=1000", plain=False)
    assert daemon.build(cfg, intake=MemoryIntake([])).trainer.candidate().reason == "no holdout yet"
    off = config(tmp_path, "snapshot.every_steps=1000", "gate.enabled=false", plain=False)
    assert daemon.build(off, intake=MemoryIntake([])).trainer.candidate().reason == "gate off"


def test_a_published_candidates_holdout_predictions_are_reused(tmp_path):
    """Publishing a candidate keeps its holdout predictions: the next candidate re-scores nothing of it."""
    parts, prog = gated(tmp_path)
    parts.persistence.snapshot(prog, sync=True)  # the same weights again: accepted, snapshot 2
    tr = parts.trainer
    slots, _ = tr.holdout._store.filled()
    assert not tr._published_preds.stale(slots, tr.holdout._store.filled()[1]).any()
    seen = []
    tr._scratch.register_forward_hook(lambda m, args, out: seen.append(int(args[0].shape[0])))
    tr.candidate()
    assert seen == []  # the published snapshot's predictions were all still valid


def test_the_gate_keeps_a_worse_candidate_from_latest(tmp_path):
    parts, prog = gated(tmp_path)
    good = parts.trainer.candidate().score
    with torch.no_grad():  # the student forgets everything: a regression on the holdout
        for p in parts.learner.student.parameters():
            p.normal_(0, 1)
    parts.persistence.snapshot(prog, sync=True)
    assert SnapshotStore(tmp_path / "sn").versions() == [1]
    assert parts.registry.get_sample_value("streamkd_snapshot_gate_rejections_total") == 1
    rejection = parts.trainer.last_rejection
    assert rejection["published"]["agreement"] == good["agreement"]
    assert rejection["candidate"]["agreement"] < good["agreement"] - 0.01

    parts.persistence.force_publish()  # an operator's call: published whatever the gate says
    assert parts.persistence.due(prog, 0.0)
    parts.persistence.snapshot(prog, sync=True)
    latest = SnapshotStore(tmp_path / "sn").latest()
    assert latest["version"] == 2 and latest["gate_decision"]["reason"].startswith("forced")
    assert latest["gate"]["rejections"] == 1 and latest["holdout"]["n"] > 0


def test_the_gate_accepts_a_candidate_as_good_as_the_published_one(tmp_path):
    parts, prog = gated(tmp_path)
    parts.persistence.snapshot(prog, sync=True)  # the same weights again: within the tolerance
    assert SnapshotStore(tmp_path / "sn").versions() == [1, 2]
    assert parts.registry.get_sample_value("streamkd_snapshot_gate_rejections_total") == 0


def test_a_quarter_budget_sends_a_quarter_of_the_samples_to_the_teacher(tmp_path):
    cfg = config(tmp_path, "teacher.budget=0.25", "teacher.random_share=0.1", plain=False)
    parts = daemon.build(cfg, intake=MemoryIntake(batches(40)))
    sizes = []
    real = parts.labeller.teacher
    parts.labeller.teacher = lambda x: (sizes.append(int(x.shape[0])), real(x))[1]
    prog = run(parts, 40 * BATCH)
    calls = parts.registry.get_sample_value("streamkd_teacher_calls_total")
    assert calls == sum(sizes)
    assert abs(calls / (40 * BATCH) - 0.25) < 0.06
    assert parts.registry.get_sample_value("streamkd_teacher_budget_ratio") == 0.25
    assert prog.samples_seen == calls  # only labelled samples enter the lineage; the others are consumed
    assert prog.offsets == {0: 40 * BATCH}


class SizedIntake(MemoryIntake):
    """Reads ``batch_size`` records per batch, as the Kafka intake does, from one long stream."""

    def __init__(self, n: int, batch_size: int = BATCH):
        super().__init__([])
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)
        self.done, self.batch_size, self.sizes = 0, batch_size, []

    def next(self, timeout):
        i, n = self.done, len(self.images)
        if i >= n:
            return None
        self.done = j = min(n, i + self.batch_size)
        self.sizes.append(j - i)
        return Batch(images=self.images[i:j], labels=torch.full((j - i,), -1), offsets={0: j}, records=j - i,
                     first_offsets={0: i})


def test_a_low_budget_reads_bigger_batches_so_each_step_trains_a_full_batch(tmp_path):
    """At budget 1/4 a step reads 4 batches' worth of records and the teacher labels about one batch of them:
    the student trains full fresh batches, and there are a quarter as many steps."""
    cfg = config(tmp_path, "teacher.budget=0.25", "replay.enabled=false", "gate.enabled=false", plain=False)
    intake = SizedIntake(48 * BATCH)
    parts = daemon.build(cfg, intake=intake)
    labelled = []
    real = parts.labeller.teacher
    parts.labeller.teacher = lambda x: (labelled.append(int(x.shape[0])), real(x))[1]
    prog = run(parts, 48 * BATCH)
    assert intake.sizes == [4 * BATCH] * 12
    assert prog.step == 12 and sum(labelled) == prog.samples_seen == 12 * BATCH
    assert all(abs(n - BATCH) <= 1 for n in labelled), labelled  # stochastic rounding: BATCH +- 1
    # steps_per_batch auto: two updates per labelled batch at a quarter budget; the fresh rows count once.
    assert parts.learner.scheduler.last_epoch == 24


def test_records_per_step_follow_the_budget_within_limits():
    budget = TeacherBudget(1.0, 0.1, 1.0, 0.1, None, seed=0)
    assert budget.records_per_step(32) == 32
    assert TeacherBudget(0.25, 0.1, 1.0, 0.1, None, seed=0).records_per_step(32) == 128
    assert TeacherBudget(0.001, 0.1, 1.0, 0.1, None, seed=0).records_per_step(32) == 32 * MAX_SPREAD
    adaptive = TeacherBudget("adaptive", 0.1, 1.0, 0.1, None, seed=0)
    assert adaptive.records_per_step(32) == 32  # starts at the ceiling
    adaptive.controller.budget = 0.5
    assert adaptive.records_per_step(32) == 64


@pytest.mark.parametrize("budget, setting, steps", [(1.0, "auto", 1), (0.5, "auto", 1), (0.25, "auto", 2),
                                                    (0.1, "auto", 3), (1.0, 3, 3), (0.25, 1, 1)])
def test_steps_per_batch(budget, setting, steps):
    assert TeacherBudget(budget, 0.1, 1.0, 0.1, None, seed=0).steps_per_batch(setting) == steps


def test_a_drift_raises_the_budget_and_the_learning_rate_and_protects_replay(tmp_path):
    cfg = config(tmp_path, "teacher.budget=adaptive", "teacher.budget_floor=0.2", "drift.lr_boost=3",
                 "drift.protect_samples=1000",
                 "drift.boost_steps=10", plain=False)
    parts = daemon.build(cfg, intake=MemoryIntake(batches(4)))
    run(parts, 4 * BATCH)
    tr = parts.trainer
    tr.budget.controller.budget = 0.2
    tr.on_drift({"signal": "agreement", "samples_seen": 100, "mean_before": 0.9, "mean_after": 0.5})
    assert tr.budget.value == 0.2  # the controller moves on its next update...
    tr.budget.update(0.5, drift=True)  # ...which the monitor's detection drives
    assert tr.budget.value == 1.0
    assert tr.replay.protected
    assert parts.registry.get_sample_value("streamkd_drift_detected_total") == 1
    lab = parts.labeller(batches(1)[0].images, torch.full((BATCH,), -1))
    tr.step(lab)
    assert 1.0 < parts.learner.lr_scale <= 3.0  # boosted, decaying back to 1 over 10 steps
    assert tr.manifest()["drift"]["detected"] == 1


def test_a_drift_trains_each_batch_boost_updates_times_while_the_boost_lasts(tmp_path):
    cfg = config(tmp_path, "drift.boost_updates=3", "drift.boost_steps=2", "gate.enabled=false", plain=False)
    parts = daemon.build(cfg, intake=MemoryIntake(batches(2)))
    run(parts, 2 * BATCH)
    tr, sched = parts.trainer, parts.learner.scheduler
    lab = parts.labeller(batches(1)[0].images, torch.full((BATCH,), -1))
    before = sched.last_epoch
    tr.step(lab)
    assert sched.last_epoch == before + 1  # no drift: one update per batch at the full budget
    tr.on_drift({"signal": "confidence", "samples_seen": 100, "mean_before": 0.9, "mean_after": 0.5})
    for expected in (3, 3, 1):  # two boosted steps, then back to one update
        before = sched.last_epoch
        tr.step(lab)
        assert sched.last_epoch - before == expected


def spied(tmp_path, *extra):
    """A trained loop whose replay draws record the ``recent`` share each one asked for."""
    cfg = config(tmp_path, "drift.boost_updates=3", "drift.boost_steps=2", "gate.enabled=false", *extra,
                 plain=False)
    parts = daemon.build(cfg, intake=MemoryIntake(batches(2)))
    run(parts, 2 * BATCH)
    asked, draw = [], parts.trainer.replay.sample
    parts.trainer.replay.sample = lambda n, fresh=0, recent=None: asked.append(recent) or draw(n, fresh, recent)
    return parts, asked


def test_the_extra_updates_of_a_boost_replay_the_latest_samples(tmp_path):
    parts, asked = spied(tmp_path, "drift.boost_recent_share=0.75")
    tr = parts.trainer
    lab = parts.labeller(batches(1)[0].images, torch.full((BATCH,), -1))
    tr.on_drift(drift("input_shift"))
    tr.step(lab)
    assert asked == [None, 0.75, 0.75]  # the first update keeps the usual mix, the extra ones replay the latest
    tr.step(lab)
    asked.clear()
    tr.step(lab)  # the boost is over: one update, the usual mix
    assert asked == [None]


@pytest.mark.parametrize("kind", ["new_classes", "label_shift"])
def test_a_boost_after_another_kind_of_drift_keeps_the_usual_replay_mix(tmp_path, kind):
    parts, asked = spied(tmp_path, "drift.boost_on=all", "checkpoint.every_steps=1000")
    tr = parts.trainer
    tr.on_drift(drift(kind))
    tr.step(parts.labeller(batches(1)[0].images, torch.full((BATCH,), -1)))
    assert asked == [None, None, None]  # boosted (three updates), but the new labels are not replayed more
    assert tr.state_dict()["boost_kind"] == kind
    tr.on_drift(drift("input_shift"))
    restored = daemon.build(config(tmp_path / "r", "gate.enabled=false", plain=False), intake=MemoryIntake([]))
    restored.trainer.load_state_dict(tr.state_dict())
    assert restored.trainer.boost_kind == "input_shift" and restored.trainer._boosting("input_shift")


def drift(kind: str) -> dict:
    return {"signal": "agreement", "samples_seen": 100, "mean_before": 0.9, "mean_after": 0.5, "kind": kind,
            "novel_share": 0.0}


@pytest.mark.parametrize("kind", ["new_classes", "label_shift"])
def test_a_drift_that_is_no_input_shift_gets_no_boost(tmp_path, kind):
    cfg = config(tmp_path, "drift.boost_updates=3", "drift.boost_steps=2", "gate.enabled=false", plain=False)
    parts = daemon.build(cfg, intake=MemoryIntake(batches(2)))
    run(parts, 2 * BATCH)
    tr, sched = parts.trainer, parts.learner.scheduler
    tr.ema.updates = 10_000  # past the warmup ramp
    tr.on_drift(drift(kind))
    assert tr.boost.multiplier == 1.0 and tr.ema.current_decay() == cfg.ema.decay
    before = sched.last_epoch
    tr.step(parts.labeller(batches(1)[0].images, torch.full((BATCH,), -1)))
    assert sched.last_epoch == before + 1  # no extra updates
    assert tr.manifest()["drift"]["last"]["kind"] == kind and tr.manifest()["drift"]["detected"] == 1


def test_the_drift_monitor_reads_the_teachers_classes_and_resumes_with_them(tmp_path):
    cfg = config(tmp_path, "gate.enabled=false", "checkpoint.every_steps=1000", plain=False)
    parts = daemon.build(cfg, intake=MemoryIntake(batches(4)))
    run(parts, 4 * BATCH)
    monitor = parts.trainer.drift
    assert monitor.mix is not None and monitor.mix.sum() == pytest.approx(1.0)
    assert 0.0 < monitor.usual_confidence <= 1.0
    restored = daemon.build(config(tmp_path / "r", "gate.enabled=false", plain=False),
                            intake=MemoryIntake(batches(1)))
    restored.trainer.load_state_dict(parts.trainer.state_dict())
    assert restored.trainer.drift.mix.tolist() == monitor.mix.tolist()
    assert restored.trainer.drift.usual_confidence == monitor.usual_confidence


def test_boost_on_all_boosts_after_any_drift(tmp_path):
    cfg = config(tmp_path, "drift.boost_updates=3", "drift.boost_steps=2", "gate.enabled=false",
                 "drift.boost_on=all", "drift.ema_decay=0.5", plain=False)
    parts = daemon.build(cfg, intake=MemoryIntake(batches(2)))
    run(parts, 2 * BATCH)
    tr, sched = parts.trainer, parts.learner.scheduler
    tr.ema.updates = 10_000
    tr.on_drift(drift("new_classes"))
    assert tr.boost.multiplier == 3.0 and tr.ema.current_decay() == 0.5
    before = sched.last_epoch
    tr.step(parts.labeller(batches(1)[0].images, torch.full((BATCH,), -1)))
    assert sched.last_epoch == before + 3


def test_a_drift_makes_the_served_ema_follow_the_student(tmp_path):
    cfg = config(tmp_path, "drift.ema_decay=0.5", "drift.ema_steps=10", "drift.boost_updates=1",
                 "gate.enabled=false", plain=False)
    parts = daemon.build(cfg, intake=MemoryIntake(batches(4)))
    run(parts, 4 * BATCH)
    tr = parts.trainer
    tr.ema.updates = 10_000  # past the warmup ramp
    assert tr.ema.current_decay() == cfg.ema.decay
    tr.on_drift({"signal": "confidence", "samples_seen": 100, "mean_before": 0.9, "mean_after": 0.5})
    assert tr.ema.current_decay() == 0.5
    tr.step(parts.labeller(batches(1)[0].images, torch.full((BATCH,), -1)))
    assert 0.5 < tr.ema.current_decay() < cfg.ema.decay  # rising back over 10 updates
    assert tr.state_dict()["ema"]["follow"].tolist()[2] == 9

    off = config(tmp_path / "off", "drift.ema_steps=0", "gate.enabled=false", plain=False)
    parts = daemon.build(off, intake=MemoryIntake(batches(2)))
    run(parts, 2 * BATCH)
    parts.trainer.ema.updates = 10_000
    parts.trainer.on_drift({"signal": "confidence", "samples_seen": 100, "mean_before": 0.9, "mean_after": 0.5})
    assert parts.trainer.ema.current_decay() == off.ema.decay


def test_balanced_replay_is_wired_and_resumes_from_the_checkpoint(tmp_path):
    cfg = config(tmp_path, "checkpoint.every_steps=1000", "replay.balance=true", "replay.reweight=false",
                 "replay.capacity=64", plain=False)
    first = daemon.build(cfg, intake=MemoryIntake(batches(10)))
    run(first, 10 * BATCH)
    tr = first.trainer
    assert tr.replay.balance and len(tr.replay) == 64
    assert sum(len(s) for s in tr.replay._slots) == tr.replay._res_len  # every reservoir slot has its class
    again = daemon.build(cfg, intake=MemoryIntake([]))
    again.persistence.resume(again.accounting.prog)
    tr2 = again.trainer
    assert tr2.replay._class_seen == tr.replay._class_seen and torch.equal(tr2.replay._recent, tr.replay._recent)
    for a, b in zip(tr.replay.sample(16, fresh=BATCH), tr2.replay.sample(16, fresh=BATCH), strict=True):
        assert torch.equal(a, b)


def test_replayed_and_stored_samples_carry_their_divergence_from_the_teacher(tmp_path):
    cfg = config(tmp_path, "gate.enabled=false", "drift.enabled=false", "replay.recency_share=0",
                 "replay.priority=1", plain=False)
    parts = daemon.build(cfg, intake=MemoryIntake(batches(12)))
    tr, learner = parts.trainer, parts.learner
    assert tr.replay.priority == 1.0
    seen = {"added": 0, "replayed": 0}
    add, reprioritize = tr.replay.add, tr.replay.reprioritize

    def spy_add(x, t, y, priority=None):
        # The fresh rows come first in the step's batch: they are stored with their divergence.
        assert torch.equal(priority, learner.last_divergence[:x.shape[0]])
        seen["added"] += 1
        add(x, t, y, priority)

    def spy_reprioritize(slots, divergence):
        assert torch.equal(divergence, learner.last_divergence[-slots.shape[0]:])  # the replayed rows, last
        reprioritize(slots, divergence)
        want: dict[int, float] = {}  # a slot drawn twice keeps the larger value
        for slot, d in zip(slots.tolist(), divergence.tolist(), strict=True):
            want[slot] = max(want.get(slot, 0.0), d)
        assert tr.replay._prio[list(want)].tolist() == list(want.values())
        seen["replayed"] += 1

    tr.replay.add, tr.replay.reprioritize = spy_add, spy_reprioritize
    torch.manual_seed(0)
    run(parts, 12 * BATCH)
    assert seen["added"] == 12 and seen["replayed"] == 11  # the first step has nothing to replay yet
    assert bool((tr.replay._prio[:len(tr.replay)] != 1.0).all())  # every stored sample has a measured priority


def test_each_step_trains_with_the_weights_of_the_class_prior(tmp_path):
    """replay.reweight: the step's rows (fresh first, replayed last) get ClassPrior's weights for them."""
    cfg = config(tmp_path, "gate.enabled=false", "drift.enabled=false", plain=False)
    parts = daemon.build(cfg, intake=MemoryIntake(batches(10)))
    tr, real = parts.trainer, parts.learner.step
    given, made = [], []
    weights = tr.prior.weights

    def spy_weights(top1, stream_rows, ring_share):
        assert stream_rows == BATCH and ring_share == tr.replay.ring_share()
        made.append(weights(top1, stream_rows, ring_share))
        return made[-1]

    def spy_step(x, t, y, fresh=None, weight=None):
        given.append(weight)
        if weight is not None:
            torch.testing.assert_close(weight.mean(), torch.tensor(1.0))
        return real(x, t, y, fresh=fresh, weight=weight)

    tr.prior.weights, parts.learner.step = spy_weights, spy_step
    run(parts, 10 * BATCH)
    assert given[0] is None  # the first step has nothing to replay: the fresh rows alone, unweighted
    assert len(given) == 10 and all(w is m for w, m in zip(given[1:], made, strict=True))
    assert float(tr.prior.state_dict()["counts"].sum()) == 10 * BATCH


def test_without_reweight_every_row_weighs_the_same(tmp_path):
    cfg = config(tmp_path, "gate.enabled=false", "replay.reweight=false", plain=False)
    parts = daemon.build(cfg, intake=MemoryIntake(batches(6)))
    given, real = [], parts.learner.step
    parts.learner.step = lambda x, t, y, fresh=None, weight=None: given.append(weight) or real(x, t, y, fresh=fresh)
    run(parts, 6 * BATCH)
    assert parts.trainer.prior is None and given == [None] * 6


def test_a_checkpoint_without_a_class_prior_starts_it_from_the_replay_buffer(tmp_path):
    """A checkpoint written with replay.reweight off resumes with it on: the class shares come from the buffer
    (its reservoir scaled to the samples seen), so no replayed class weighs 0 for not being seen since."""
    off = config(tmp_path, "checkpoint.every_steps=1000", "gate.enabled=false", "replay.reweight=false", plain=False)
    first = daemon.build(off, intake=MemoryIntake(batches(10)))
    run(first, 10 * BATCH)
    assert "prior" not in CheckpointStore(tmp_path / "ck").load_latest().learning
    on = config(tmp_path, "checkpoint.every_steps=1000", "gate.enabled=false", plain=False)
    again = daemon.build(on, intake=MemoryIntake([]))
    again.persistence.resume(again.accounting.prog)
    reservoir, _ = first.trainer.replay.class_counts()
    counts = again.trainer.prior.state_dict()["counts"]
    assert float(counts.sum()) == pytest.approx(first.trainer.replay.seen)
    assert torch.equal(counts > 0, reservoir > 0)
    held = torch.nonzero(reservoir).squeeze(1)
    assert bool((again.trainer.prior.weights(held, 0, 0.25) > 0).all())
