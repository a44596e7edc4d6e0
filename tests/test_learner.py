"""The online step: prequential scoring, the non-finite guard, precision and compile paths."""

from __future__ import annotations

import pytest
import torch

from streamkd.config import TrainConfig
from streamkd.learn.learner import InputSpec, Learner, S, Teacher, resolve_precision
from streamkd.learn.models import build_model

SPEC = InputSpec((28, 28), 1, (0.5,), (0.5,))


def learner(**kw) -> Learner:
    torch.manual_seed(0)
    model = build_model("streamkd:lenet5", 10, in_channels=1, input_size=(28, 28))
    return Learner(model, SPEC, TrainConfig(**kw), torch.device("cpu"), kw.pop("amp", None))


def batch(n=16):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g), torch.randn(n, 10, generator=g)


def weights(lr: Learner) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lr.student.state_dict().items()}


def test_prequential_scores_use_weights_before_the_update():
    lr = learner()
    x, t = batch()
    with torch.no_grad():
        before = lr.student(SPEC(x)).argmax(1)
    stats = lr.step(x, t, torch.full((16,), -1))
    assert stats[S["agree"]].item() == (before == t.argmax(1)).sum().item()
    assert stats[S["n"]].item() == 16 and stats[S["skipped"]].item() == 0


def test_label_accuracy_counts_only_labelled_samples():
    lr = learner()
    x, t = batch()
    y = torch.full((16,), -1)
    y[:4] = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        pred = lr.student(SPEC(x)).argmax(1)
    stats = lr.step(x, t, y)
    assert stats[S["labelled"]].item() == 4
    assert stats[S["correct"]].item() == (pred[:4] == y[:4]).sum().item()


def test_nonfinite_teacher_rows_are_dropped_not_trained():
    lr = learner()
    x, t = batch()
    t[3] = float("nan")
    t[7, 2] = float("inf")
    stats = lr.step(x, t, torch.full((16,), -1))
    assert stats[S["n_finite"]].item() == 14 and stats[S["skipped"]].item() == 0
    assert all(torch.isfinite(v).all() for v in lr.student.state_dict().values())


def test_nonfinite_update_is_skipped_entirely():
    lr = learner()
    x, t = batch()
    lr.step(x, t, torch.full((16,), -1))  # optimizer state exists now
    before = weights(lr)
    stats = lr.step(x, torch.full_like(t, float("nan")), torch.full((16,), -1))
    assert stats[S["skipped"]].item() == 1
    for k, v in weights(lr).items():
        assert torch.equal(v, before[k]), k
    # a NaN gradient (poisoned weights -> NaN loss) is skipped the same way
    with torch.no_grad():
        next(lr.student.parameters()).view(-1)[0] = float("nan")
    poisoned = weights(lr)
    stats = lr.step(x, t, torch.full((16,), -1))
    assert stats[S["skipped"]].item() == 1
    for k, v in weights(lr).items():
        assert torch.equal(v.nan_to_num(7.0), poisoned[k].nan_to_num(7.0)), k


def test_bf16_autocast_path_on_cpu():
    assert resolve_precision("auto", torch.device("cpu")) is None
    assert resolve_precision("bf16", torch.device("cpu")) is torch.bfloat16
    torch.manual_seed(0)
    model = build_model("streamkd:lenet5", 10, in_channels=1, input_size=(28, 28))
    lr = Learner(model, SPEC, TrainConfig(), torch.device("cpu"), torch.bfloat16)
    teacher = Teacher(build_model("streamkd:fmnist_cnn", 10, in_channels=1, input_size=(28, 28)), SPEC,
                      torch.device("cpu"), torch.bfloat16, channels_last=True)
    x, _ = batch()
    t = teacher(x)
    assert t.dtype == torch.float32 and t.shape == (16, 10)
    stats = lr.step(x, t, torch.full((16,), -1))
    assert stats[S["skipped"]].item() == 0 and torch.isfinite(stats).all()


def test_teacher_auto_precision_follows_native_bf16(monkeypatch):
    import streamkd.learn.learner as learner_mod

    cpu = torch.device("cpu")
    monkeypatch.setattr(learner_mod, "native_bf16", lambda device: True)
    assert resolve_precision("auto", cpu, inference=True) is torch.bfloat16
    assert resolve_precision("auto", cpu) is None  # the student trains in fp32 on a CPU either way
    monkeypatch.setattr(learner_mod, "native_bf16", lambda device: False)
    assert resolve_precision("auto", cpu, inference=True) is None
    assert resolve_precision("auto", torch.device("cuda"), inference=True) is torch.float16  # pre-Ampere GPU
    assert resolve_precision("fp32", cpu, inference=True) is None  # explicit choices win


def test_bf16_teacher_agrees_with_fp32_on_real_images():
    """The shipped teacher in bf16 (what ``auto`` picks on CPUs with AVX512-BF16) gives the same labels."""
    from streamkd.commands.datasets import load_fashion_mnist
    from streamkd.learn.models import shipped_teacher_weights

    images, labels = load_fashion_mnist("test")
    x, y = torch.as_tensor(images[:1000]), torch.as_tensor(labels[:1000])
    spec = InputSpec((28, 28), 1, (0.2860,), (0.3530,))
    out = {}
    for amp in (None, torch.bfloat16):
        model = build_model("streamkd:fmnist_cnn", 10, in_channels=1, input_size=(28, 28),
                            weights=str(shipped_teacher_weights()))
        out[amp] = Teacher(model, spec, torch.device("cpu"), amp, channels_last=True)(x)
    full, half = out[None], out[torch.bfloat16]
    assert (full.argmax(1) == half.argmax(1)).float().mean() >= 0.995
    assert abs((full.argmax(1) == y).float().mean() - (half.argmax(1) == y).float().mean()) <= 0.003
    p, q = (full / 4).softmax(1), (half / 4).softmax(1)  # the soft targets at the default T
    assert (p * (p.log() - q.log())).sum(1).mean() < 1e-4


def test_folded_teacher_matches_the_plain_model():
    torch.manual_seed(0)
    model = build_model("streamkd:fmnist_cnn", 10, in_channels=1, input_size=(28, 28)).eval()
    for m in model.modules():  # non-trivial BN statistics, so folding has something to get wrong
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x, _ = batch()
    with torch.no_grad():
        want = model(SPEC(x))
    teacher = Teacher(model, SPEC, torch.device("cpu"), None, channels_last=True)
    torch.testing.assert_close(teacher(x), want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_compiled_student_matches_eager():
    pytest.importorskip("torch._inductor")
    x, t = batch()
    y = torch.full((16,), -1)
    eager, compiled = learner(), learner(compile=True)
    compiled.forward = torch.compile(compiled.student, backend="aot_eager")  # no C++ toolchain needed
    for _ in range(2):
        a, b = eager.step(x, t, y), compiled.step(x, t, y)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_warmup_leaves_no_trace():
    """Warm-up (compile, kernel choice) must not move weights, optimizer, BatchNorm statistics or the RNG."""
    def make() -> Learner:
        torch.manual_seed(0)
        model = build_model("streamkd:fmnist_cnn", 10, in_channels=1, input_size=(28, 28))  # BN + dropout
        return Learner(model, SPEC, TrainConfig(), torch.device("cpu"), None)

    x, t = batch()
    y = torch.full((16,), -1)
    plain, warmed = make(), make()
    for lr in (plain, warmed):
        torch.manual_seed(3)
        lr.step(x, t, y)  # optimizer state exists, BN statistics moved
    before = {k: v.clone() for k, v in warmed.student.state_dict().items()}
    opt_before = warmed.optimizer.state_dict()
    blank = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8)
    torch.manual_seed(5)
    warmed.warmup(blank)  # dropout draws random numbers: the state must come back
    after_rng = torch.random.get_rng_state()
    torch.manual_seed(5)
    assert torch.equal(after_rng, torch.random.get_rng_state())
    for k, v in warmed.student.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in warmed.student.parameters())
    assert str(warmed.optimizer.state_dict()) == str(opt_before)
    torch.manual_seed(7)
    a = plain.step(x, t, y)
    torch.manual_seed(7)
    b = warmed.step(x, t, y)
    assert torch.equal(a, b)
    for (k, v), w in zip(plain.student.state_dict().items(), warmed.student.state_dict().values(), strict=False):
        assert torch.equal(v, w), k


def test_row_weights_reach_the_loss_and_the_update():
    """weight=2 everywhere doubles the loss the step reports (and descends on) but not the unweighted KD term;
    weight 0 on every row but one trains on that row alone."""
    x, t = batch()
    y = torch.full((16,), -1)
    plain, doubled = learner().step(x, t, y), learner().step(x, t, y, weight=torch.full((16,), 2.0))
    torch.testing.assert_close(doubled[S["loss"]], 2 * plain[S["loss"]])
    torch.testing.assert_close(doubled[S["kd"]], plain[S["kd"]])
    one = torch.zeros(16)
    one[5] = 16.0
    a, b = learner(), learner()
    a.step(x, t, y, weight=one)
    b.step(x[5:6], t[5:6], y[5:6])
    for k, v in a.student.state_dict().items():
        torch.testing.assert_close(v, b.student.state_dict()[k], atol=1e-6, rtol=1e-5)
