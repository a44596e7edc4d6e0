"""Holdout and gate: the diverted share, exclusion from training, scoring, decisions, checkpoint state."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from streamkd.learn.gate import Gate, Holdout, Predictions

K = 4


def stream(start: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n samples whose label is their stream index."""
    ids = torch.arange(start, start + n)
    images = (ids % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return images, torch.randn(n, K), ids


class PixelClassifier(nn.Module):
    """Predicts class (first pixel value) % K: a model whose answers a test can work out."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(x[:, 0, 0, 0].round().long() % K, K).float() + self.dummy


def test_a_share_of_the_stream_is_diverted_deterministically():
    h = Holdout(100_000, 0.1, seed=5)
    keep = torch.cat([h.offer(*stream(i, 500)) for i in range(0, 20_000, 500)])
    diverted = int((~keep).sum())
    assert keep.dtype == torch.bool and keep.shape == (20_000,)
    # Binomial(20000, 0.1): sd 42; 5 sd either side.
    assert 1788 < diverted < 2212
    assert h.offered == 20_000 and h.diverted == diverted == len(h)
    again = Holdout(100_000, 0.1, seed=5)
    assert torch.equal(torch.cat([again.offer(*stream(i, 500)) for i in range(0, 20_000, 500)]), keep)
    other = Holdout(100_000, 0.1, seed=6)
    assert not torch.equal(torch.cat([other.offer(*stream(i, 500)) for i in range(0, 20_000, 500)]), keep)


def test_held_out_samples_are_never_kept_for_training_and_the_holdout_is_bounded():
    h = Holdout(50, 0.2, seed=0)
    trained: set[int] = set()
    for i in range(0, 5000, 100):
        images, logits, ids = stream(i, 100)
        keep = h.offer(images, logits, ids)
        trained |= set(ids[keep].tolist())
    held = set(h._store.contents()[2].tolist())
    assert len(held) == len(h) == 50
    assert not held & trained
    assert max(held) > 1000  # a reservoir over the whole stream, not the first 50 diverted


def test_zero_share_keeps_everything():
    h = Holdout(10, 0.0, seed=0)
    assert h.offer(*stream(0, 64)).all() and len(h) == 0
    assert h.score(PixelClassifier(), lambda x: x.float()) == {
        "agreement": None, "accuracy": None, "n": 0, "labelled": 0, "revision": 0}


def test_score_counts_agreement_and_accuracy_on_labelled_samples():
    h = Holdout(100, 1.0, seed=0)
    n = 40
    ids = torch.arange(n)
    images = ids.to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    model_says = ids % K
    teacher = torch.where(ids < 30, model_says, (model_says + 1) % K)  # the model agrees on 30 of 40
    labels = torch.full((n,), -1)
    labels[:10] = model_says[:10]  # 10 labelled and right ...
    labels[10:20] = (model_says[10:20] + 1) % K  # ... and 10 labelled and wrong
    h.offer(images, nn.functional.one_hot(teacher, K).float(), labels)
    model = PixelClassifier().train()
    got = h.score(model, lambda x: x.float(), batch_size=7)
    assert got == {"agreement": 30 / 40, "accuracy": 10 / 20, "n": 40, "labelled": 20, "revision": h.revision}
    assert model.training  # mode restored


def test_a_prediction_cache_runs_the_model_only_on_samples_written_since():
    """The published snapshot is scored at every candidate: with its cache, only new holdout samples cost."""
    h = Holdout(50, 1.0, seed=0)
    h.offer(*stream(0, 30))
    model = PixelClassifier()
    seen = []
    model.register_forward_hook(lambda m, args, out: seen.append(int(args[0].shape[0])))
    cache = Predictions()
    first = h.score(model, lambda x: x.float(), cache=cache)
    assert sum(seen) == 30
    assert h.score(model, lambda x: x.float(), cache=cache) == first and sum(seen) == 30  # nothing new: no forward
    h.offer(*stream(30, 200))  # fills the rest, then replaces reservoir slots
    seen.clear()
    cached = h.score(model, lambda x: x.float(), cache=cache)
    written = sum(seen)
    assert 20 <= written < 50  # the 20 free slots and the replaced ones, not the whole holdout again
    assert cached == h.score(model, lambda x: x.float())  # the same answer as scoring from scratch


def test_score_passes_as_many_samples_at_once_as_fit_in_its_input_budget(monkeypatch):
    from streamkd.learn import gate

    h = Holdout(50, 1.0, seed=0)
    h.offer(*stream(0, 10))  # 1×2×2 images: 16 bytes of float32 input each
    model, seen = PixelClassifier(), []
    model.register_forward_hook(lambda m, args, out: seen.append(int(args[0].shape[0])))
    whole = h.score(model, lambda x: x.float())
    assert seen == [10]  # the default budget holds the whole holdout
    monkeypatch.setattr(gate, "SCORE_BYTES", 3 * 16)
    seen.clear()
    assert h.score(model, lambda x: x.float()) == whole and seen == [3, 3, 3, 1]


def test_score_without_labels_has_no_accuracy():
    h = Holdout(100, 1.0, seed=0)
    images, logits, ids = stream(0, 8)
    h.offer(images, logits, torch.full((8,), -1))
    got = h.score(PixelClassifier(), lambda x: x.float())
    want = int(((ids % K) == logits.half().argmax(1)).sum()) / 8  # the model says id % K; the teacher its argmax
    assert got["accuracy"] is None and got["n"] == 8 and got["agreement"] == want


def test_revision_changes_with_the_content():
    h = Holdout(5, 1.0, seed=0)
    h.offer(*stream(0, 5))
    r = h.revision
    h.offer(*stream(5, 200))
    assert h.revision > r


def test_gate_accepts_the_first_snapshot():
    assert Gate(0.01).decide({"agreement": 0.1, "accuracy": None, "n": 10}, None) == (True, "first snapshot")


def test_gate_accepts_within_tolerance_and_rejects_beyond():
    gate = Gate(0.01)
    published = {"agreement": 0.90, "accuracy": None, "n": 1000}
    ok, reason = gate.decide({"agreement": 0.95, "accuracy": None, "n": 1000}, published)
    assert ok and "0.9500" in reason
    assert gate.decide({"agreement": 0.895, "accuracy": None, "n": 1000}, published)[0]
    assert gate.decide({"agreement": 0.89, "accuracy": None, "n": 1000}, published)[0]  # exactly the tolerance
    assert gate.decide({"agreement": 0.09, "accuracy": None, "n": 100}, {"agreement": 0.1})[0]  # 0.1 - 0.01 > 0.09
    ok, reason = gate.decide({"agreement": 0.889, "accuracy": None, "n": 1000}, published)
    assert not ok
    assert "agreement 0.8890" in reason and "0.9000" in reason


def test_gate_checks_accuracy_when_both_scores_have_it():
    gate = Gate(0.01)
    published = {"agreement": 0.90, "accuracy": 0.80, "n": 1000}
    ok, reason = gate.decide({"agreement": 0.91, "accuracy": 0.75, "n": 1000}, published)
    assert not ok and "accuracy 0.7500" in reason
    assert gate.decide({"agreement": 0.91, "accuracy": 0.795, "n": 1000}, published)[0]
    # Accuracy on one side only: agreement decides.
    assert gate.decide({"agreement": 0.91, "accuracy": None, "n": 1000}, published)[0]
    assert gate.decide({"agreement": 0.91, "accuracy": 0.1, "n": 1000}, {"agreement": 0.9, "accuracy": None})[0]


def test_gate_without_a_holdout_score_accepts_and_bad_tolerance_is_refused():
    published = {"agreement": 0.9, "accuracy": None, "n": 1000}
    assert Gate(0.0).decide({"agreement": None, "accuracy": None, "n": 0}, published)[0]
    with pytest.raises(ValueError, match="tolerance"):
        Gate(-0.1)


def test_zero_tolerance_rejects_any_drop():
    published = {"agreement": 0.9, "accuracy": None, "n": 1000}
    assert not Gate(0.0).decide({"agreement": 0.899, "accuracy": None, "n": 1000}, published)[0]


def test_holdout_state_round_trip_continues_identically():
    a = Holdout(30, 0.3, seed=2)
    for i in range(0, 600, 50):
        a.offer(*stream(i, 50))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = Holdout(30, 0.3, seed=99)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert (b.offered, b.diverted, len(b)) == (a.offered, a.diverted, len(a))
    for i in range(600, 1600, 50):
        batch = stream(i, 50)
        assert torch.equal(a.offer(*batch), b.offer(*batch))
    for x, y in zip(a._store.contents(), b._store.contents(), strict=True):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="holdout"):
        b.load_state_dict({"store": {}})
