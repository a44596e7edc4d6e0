"""EMA weights: the update rule, BatchNorm buffers, compiled and channels_last models, checkpoint state."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from streamkd.learn.ema import Ema


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))


def perturb(model: nn.Module, scale: float = 0.1) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


def test_update_is_the_exponential_moving_average():
    model = nn.Linear(3, 2)
    ema = Ema(model, 0.9, warmup=False)
    w0 = model.weight.detach().clone()
    perturb(model)
    ema.update(model)  # first update: a copy
    w1 = model.weight.detach().clone()
    assert torch.equal(ema.module.weight, w1)
    perturb(model)
    ema.update(model)
    w2 = model.weight.detach().clone()
    assert torch.allclose(ema.module.weight, 0.9 * w1 + 0.1 * w2, atol=1e-6)
    assert not torch.allclose(ema.module.weight, w0)
    assert ema.updates == 2


def test_warmup_uses_the_smaller_decay_early_on():
    model = nn.Linear(3, 2)
    ema = Ema(model, 0.99)
    ema.update(model)
    assert ema.current_decay() == pytest.approx(2 / 11)
    e1 = ema.module.weight.detach().clone()
    perturb(model)
    ema.update(model)
    assert torch.allclose(ema.module.weight, (2 / 11) * e1 + (9 / 11) * model.weight, atol=1e-6)
    ema.updates = 10_000
    assert ema.current_decay() == 0.99


def test_follow_lowers_the_decay_then_rises_back_linearly():
    model = nn.Linear(3, 2)
    ema = Ema(model, 0.99, warmup=False)
    ema.update(model)
    ema.follow(0.5, 4)
    decays = []
    for _ in range(6):
        decays.append(ema.current_decay())
        ema.update(model)
    assert decays == pytest.approx([0.5, 0.6225, 0.745, 0.8675, 0.99, 0.99])
    ema.follow(0.999, 3)  # a follow decay above the configured one changes nothing
    assert ema.current_decay() == 0.99


def test_follow_catches_up_with_a_model_that_moved():
    slow, fast = nn.Linear(3, 2), nn.Linear(3, 2)
    fast.load_state_dict(slow.state_dict())
    model = nn.Linear(3, 2)
    model.load_state_dict(slow.state_dict())
    a, b = Ema(model, 0.995, warmup=False), Ema(model, 0.995, warmup=False)
    a.update(model)
    b.update(model)
    with torch.no_grad():
        model.weight.add_(1.0)  # the stream changed: the model moved away
    b.follow(0.8, 50)
    for _ in range(50):
        a.update(model)
        b.update(model)
    gap = lambda e: float((e.module.weight - model.weight).abs().max())  # noqa: E731
    assert gap(b) < 0.01 < 0.5 < gap(a)
    with pytest.raises(ValueError, match="follow decay"):
        b.follow(1.5, 3)
    with pytest.raises(ValueError, match="follow steps"):
        b.follow(0.5, -1)


def test_a_follow_period_survives_the_checkpoint():
    model = nn.Linear(3, 2)
    ema = Ema(model, 0.99, warmup=False)
    ema.update(model)
    ema.follow(0.5, 10)
    for _ in range(3):
        ema.update(model)
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    other = Ema(nn.Linear(3, 2), 0.99, warmup=False)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other.follow_remaining == 7 and other.current_decay() == pytest.approx(ema.current_decay())
    state = ema.state_dict()
    del state["follow"]  # a state saved before follow periods existed
    other.load_state_dict(state)
    assert other.follow_remaining == 0 and other.current_decay() == 0.99


def test_batchnorm_running_stats_are_averaged_and_the_counter_copied():
    model = bn_net().train()
    ema = Ema(model, 0.8, warmup=False)
    expected_mean = None
    for i in range(5):
        model(torch.randn(8, 2, 6, 6) * (i + 1) + i)  # moves the running statistics
        bn = model[1]
        if expected_mean is None:
            expected_mean, expected_var = bn.running_mean.clone(), bn.running_var.clone()
        else:
            expected_mean = 0.8 * expected_mean + 0.2 * bn.running_mean
            expected_var = 0.8 * expected_var + 0.2 * bn.running_var
        ema.update(model)
    got = ema.module[1]
    assert torch.allclose(got.running_mean, expected_mean, atol=1e-5)
    assert torch.allclose(got.running_var, expected_var, atol=1e-5)
    assert not torch.allclose(got.running_mean, model[1].running_mean)
    assert int(got.num_batches_tracked) == int(model[1].num_batches_tracked) == 5


def test_tensors_replaced_after_an_update_are_the_ones_averaged():
    model = bn_net().train()
    ema = Ema(model, 0.5, warmup=False)
    ema.update(model)
    before = ema.module[4].weight.detach().clone()
    model[1].running_mean = torch.full((4,), 2.0)  # a new buffer object, as module.to() makes
    model[4].weight = nn.Parameter(torch.ones(3, 64))  # a new parameter object
    ema.update(model)
    assert torch.allclose(ema.module[1].running_mean, torch.full((4,), 1.0))  # 0.5 * 0 + 0.5 * 2
    assert torch.allclose(ema.module[4].weight, 0.5 * before + 0.5, atol=1e-6)
    other = bn_net()
    other.add_module("extra", nn.Linear(1, 1))
    with pytest.raises(ValueError, match="structure"):
        ema.update(other)


def test_module_is_a_frozen_eval_copy():
    model = bn_net().train()
    ema = Ema(model, 0.9)
    assert not ema.module.training and model.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    assert all(p.requires_grad for p in model.parameters())
    ema.update(model)
    with torch.no_grad():
        model[4].weight.zero_()
    assert ema.module[4].weight.abs().sum() > 0  # storage not shared


def test_compiled_channels_last_model():
    model = bn_net().to(memory_format=torch.channels_last).train()
    compiled = torch.compile(model, backend="eager")
    ema = Ema(compiled, 0.5, warmup=False)
    assert ema.module[0].weight.is_contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 2, 6, 6).contiguous(memory_format=torch.channels_last)
    ema.update(compiled)
    before = model[0].weight.detach().clone()
    compiled(x).sum().backward()
    opt.step()
    ema.update(compiled)
    assert torch.allclose(ema.module[0].weight, 0.5 * before + 0.5 * model[0].weight, atol=1e-6)

    weights = ema.weights()
    assert list(weights) == list(model.state_dict())  # no "_orig_mod." prefix
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in weights.values())
    assert torch.equal(weights["0.weight"], ema.module[0].weight)


def test_weights_are_fp32_cpu_copies():
    model = bn_net().double()
    ema = Ema(model, 0.9)
    ema.update(model)
    weights = ema.weights()
    assert weights["4.weight"].dtype == torch.float32
    assert weights["1.num_batches_tracked"].dtype == torch.int64
    weights["4.weight"].zero_()
    assert ema.module[4].weight.abs().sum() > 0


def test_state_round_trip_continues_identically():
    model = bn_net().train()
    ema = Ema(model, 0.9)
    for _ in range(3):
        model(torch.randn(8, 2, 6, 6))
        perturb(model)
        ema.update(model)
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    torch.manual_seed(9)
    other = Ema(nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                              nn.Linear(64, 3)), 0.9)
    other.load_state_dict(state)
    assert other.updates == 3
    perturb(model)
    ema.update(model)
    other.update(model)
    for k, v in ema.weights().items():
        assert torch.equal(v, other.weights()[k]), k


def test_mismatched_model_and_bad_decay_are_refused():
    ema = Ema(nn.Linear(3, 2), 0.9)
    with pytest.raises(ValueError, match="structure"):
        ema.update(nn.Sequential(nn.Linear(3, 2)))
    with pytest.raises(ValueError, match="decay"):
        Ema(nn.Linear(3, 2), 1.5)
    with pytest.raises(ValueError, match="EMA state"):
        ema.load_state_dict({"weights": {}})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this host)")
def test_update_on_cuda_does_not_wait_for_the_device():
    model = bn_net().cuda().train()
    ema = Ema(model, 0.99)
    model(torch.randn(8, 2, 6, 6, device="cuda"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync inside update() raises
    try:
        for _ in range(3):
            ema.update(model)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert ema.module[0].weight.device.type == "cuda"
