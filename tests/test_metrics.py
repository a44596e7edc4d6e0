"""The metrics holder: each verb moves exactly its series, on a fresh registry per test."""

from __future__ import annotations

from concurrent.futures import Future

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from streamkd import __version__
from streamkd.metrics import Metrics


@pytest.fixture
def reg() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def m(reg) -> Metrics:
    return Metrics(reg, device="cpu")


def own_samples(reg: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    """Every streamkd_ sample but the ``_created`` timestamps: (name, sorted labels) -> value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in reg.collect() for s in fam.samples
            if s.name.startswith("streamkd_") and not s.name.endswith("_created")}


def moved(before: dict, after: dict) -> dict:
    """The samples whose value changed (or that appeared), with their new value."""
    return {k: v for k, v in after.items() if before.get(k) != v}


def act(reg: CollectorRegistry, verb) -> dict:
    before = own_samples(reg)
    verb()
    return moved(before, own_samples(reg))


def test_consumed_and_trained(reg, m):
    assert act(reg, lambda: m.consumed(5)) == {("streamkd_messages_consumed_total", ()): 5.0}
    assert act(reg, lambda: m.consumed()) == {("streamkd_messages_consumed_total", ()): 6.0}
    assert act(reg, lambda: m.trained(64)) == {("streamkd_samples_trained_total", ()): 64.0,
                                                ("streamkd_train_steps_total", ()): 1.0}
    assert act(reg, lambda: m.trained(10, steps=2)) == {("streamkd_samples_trained_total", ()): 74.0,
                                                         ("streamkd_train_steps_total", ()): 3.0}


def test_rejections_and_skips_by_reason(reg, m):
    assert act(reg, lambda: m.rejected("corrupt")) == {
        ("streamkd_messages_rejected_total", (("reason", "corrupt"),)): 1.0}
    assert act(reg, lambda: m.rejected("decoder_crash")) == {
        ("streamkd_messages_rejected_total", (("reason", "decoder_crash"),)): 1.0}
    assert act(reg, lambda: m.skipped_update("nonfinite_grad")) == {
        ("streamkd_updates_skipped_total", (("reason", "nonfinite_grad"),)): 1.0}
    assert act(reg, lambda: m.skipped_samples("nonfinite_teacher", 3)) == {
        ("streamkd_samples_skipped_total", (("reason", "nonfinite_teacher"),)): 3.0}
    assert act(reg, lambda: m.skipped_samples("nonfinite_teacher", 0)) == {}


def test_usual_label_values_exist_at_zero(reg, m):
    """Dashboards show 0, not "no data", before the first event."""
    for reason in ("corrupt", "too_large", "too_many_pixels", "unknown_format", "bad_label"):
        assert reg.get_sample_value("streamkd_messages_rejected_total", {"reason": reason}) == 0.0
    for op in ("connect", "poll", "commit", "dlq"):
        assert reg.get_sample_value("streamkd_kafka_errors_total", {"op": op}) == 0.0
    assert reg.get_sample_value("streamkd_samples_skipped_total", {"reason": "nonfinite_teacher"}) == 0.0


def test_gauges_dlq_lag_and_progress(reg, m):
    assert act(reg, lambda: m.dead_letters_pending(4)) == {("streamkd_dlq_pending", ()): 4.0}
    assert act(reg, lambda: m.lag(2, 17)) == {("streamkd_consumer_lag_messages", (("partition", "2"),)): 17.0}
    # A high watermark read before the last fetch can be behind the trained offset: never negative.
    assert act(reg, lambda: m.lag(2, -3)) == {("streamkd_consumer_lag_messages", (("partition", "2"),)): 0.0}
    assert act(reg, lambda: m.progress(0.5, 0.75, 0.25)) == {
        ("streamkd_kd_loss", ()): 0.5, ("streamkd_teacher_agreement_ratio", ()): 0.75,
        ("streamkd_label_accuracy_ratio", ()): 0.25}
    # No estimate yet (an empty window): the previous value stays.
    assert act(reg, lambda: m.progress(0.4, None, None)) == {("streamkd_kd_loss", ()): 0.4}


def test_snapshot_and_checkpoint_verbs(reg, m):
    assert act(reg, lambda: m.snapshot_published(7, when=1_700_000_000.0)) == {
        ("streamkd_snapshots_published_total", ()): 1.0, ("streamkd_last_snapshot_version", ()): 7.0,
        ("streamkd_last_snapshot_timestamp_seconds", ()): 1_700_000_000.0}
    # Restored at start: the age is right from the first scrape, and nothing was written by this process.
    assert act(reg, lambda: m.checkpoint_restored(1_600_000_000.0)) == {
        ("streamkd_last_checkpoint_timestamp_seconds", ()): 1_600_000_000.0}
    assert act(reg, lambda: m.checkpoint_written(when=1_700_000_100.0)) == {
        ("streamkd_checkpoints_written_total", ()): 1.0,
        ("streamkd_last_checkpoint_timestamp_seconds", ()): 1_700_000_100.0}


@pytest.mark.parametrize("what, series", [("checkpoint", "streamkd_checkpoint_write_failures_total"),
                                          ("snapshot", "streamkd_snapshot_write_failures_total")])
def test_watch_write_counts_only_failed_writes(reg, m, what, series):
    ok, failed, cancelled = Future(), Future(), Future()
    for f in (ok, failed, cancelled):
        assert m.watch_write(f, what) is f
    assert act(reg, lambda: ok.set_result(None)) == {}
    assert act(reg, lambda: cancelled.cancel()) == {}
    assert act(reg, lambda: failed.set_exception(OSError("disk full"))) == {(series, ()): 1.0}


def test_build_info_and_process_metrics(reg, m):
    info = {"version": __version__, "torch": torch.__version__.split("+")[0], "device": "cpu"}
    assert reg.get_sample_value("streamkd_build_info", info) == 1.0
    # A fresh registry gets the process and platform collectors the default registry has.
    text = generate_latest(reg).decode()
    assert "\nprocess_cpu_seconds_total " in text and "python_info{" in text
    # No GPU series on a CPU daemon.
    assert "streamkd_gpu_memory" not in text


def test_holders_on_separate_registries_are_independent(reg, m):
    other_reg = CollectorRegistry()
    other = Metrics(other_reg, device="cpu")
    other.consumed(3)
    assert reg.get_sample_value("streamkd_messages_consumed_total") == 0.0
    assert other_reg.get_sample_value("streamkd_messages_consumed_total") == 3.0
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Metrics(reg)  # one holder per registry: a second would double-count


def test_names_follow_the_contract(reg, m):
    """streamkd_ prefix; only counters end in _total; the contract's names all exist."""
    families = {fam.name: fam.type for fam in reg.collect() if fam.name.startswith("streamkd_")}
    for name, kind in families.items():
        assert not name.endswith("_total"), name  # prometheus_client strips _total from counter families
        assert kind in ("counter", "gauge", "histogram", "info"), (name, kind)
    samples = {s.name for fam in reg.collect() for s in fam.samples}
    for name in ("streamkd_messages_consumed_total", "streamkd_messages_rejected_total",
                 "streamkd_samples_trained_total", "streamkd_train_steps_total", "streamkd_kd_loss",
                 "streamkd_teacher_agreement_ratio", "streamkd_teacher_inference_seconds_bucket",
                 "streamkd_train_step_seconds_bucket", "streamkd_snapshots_published_total",
                 "streamkd_last_snapshot_version", "streamkd_last_snapshot_timestamp_seconds",
                 "streamkd_build_info"):
        assert name in samples, name
    assert families["streamkd_messages_consumed"] == "counter"
    assert families["streamkd_teacher_inference_seconds"] == "histogram"
