import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from streamkd.learn import models
from streamkd.learn.models import (
    build_model,
    file_sha256,
    load_state_dict_file,
    num_classes_of,
    shipped_teacher_weights,
)


@pytest.mark.parametrize("spec", ["streamkd:lenet5", "streamkd:fmnist_cnn"])
@pytest.mark.parametrize("channels, size", [(1, (28, 28)), (3, (32, 32))])
def test_builtins_build_and_forward(spec, channels, size):
    m = build_model(spec, 10, in_channels=channels, input_size=size)
    out = m(torch.randn(3, channels, *size))
    assert out.shape == (3, 10) and out.dtype == torch.float32
    assert num_classes_of(m, size, channels) == 10


def test_lenet5_at_28_px_is_the_classic_function_without_the_identity_pool():
    """Built for 28 px the pool is left out and each max-pool precedes its ReLU: the same outputs and gradients
    as the classic ReLU -> pool layout with the adaptive pool, and the same state dict."""
    fast = build_model("streamkd:lenet5", 10, in_channels=1, input_size=(28, 28))
    assert isinstance(fast.pool, nn.Identity)
    assert isinstance(build_model("streamkd:lenet5", 10, in_channels=1, input_size=(32, 32)).pool,
                      nn.AdaptiveAvgPool2d)

    class Classic(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d((5, 5)))
            self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                                            nn.Linear(84, 10))

        def forward(self, x):
            return self.classifier(self.features(x))

    classic = Classic()
    assert sorted(classic.state_dict()) == sorted(fast.state_dict())
    classic.load_state_dict(fast.state_dict())
    x = torch.randn(16, 1, 28, 28)
    out_fast, out_classic = fast(x), classic(x)
    torch.testing.assert_close(out_fast, out_classic, rtol=0, atol=0)
    grads_fast = torch.autograd.grad(out_fast.square().sum(), list(fast.parameters()))
    grads_classic = torch.autograd.grad(out_classic.square().sum(), list(classic.parameters()))
    for a, b in zip(grads_fast, grads_classic, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fmnist_cnn_size_and_default_classes():
    m = build_model("streamkd:fmnist_cnn", None, in_channels=1, input_size=(28, 28))
    params = sum(p.numel() for p in m.parameters())
    assert 0.5e6 <= params <= 1.5e6
    assert num_classes_of(m, (28, 28), 1) == 10


def test_num_classes_of_leaves_mode_and_bn_stats_alone():
    m = build_model("streamkd:fmnist_cnn", 7, in_channels=1, input_size=(28, 28))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert m.training
    assert num_classes_of(m, (28, 28), 1) == 7
    assert m.training
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_torchvision_resnet18_one_channel_ten_classes():
    m = build_model("torchvision:resnet18", 10, in_channels=1, input_size=(32, 32))
    assert m.conv1.in_channels == 1 and m.fc.out_features == 10
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_pretrained_stem_adaptation_keeps_grey_response():
    import torchvision

    stock = torchvision.models.get_model("resnet18").eval()
    grey = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        want = stock.conv1(grey.expand(1, 3, 32, 32))
        adapted = models._adapt(stock, "torchvision:resnet18", 10, 1, pretrained=True)
        got = adapted.conv1(grey)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert adapted.fc.out_features == 10


def test_torchvision_stock_checkpoint_file_is_adapted(tmp_path):
    import torchvision

    stock = torchvision.models.get_model("mobilenet_v3_small")
    path = tmp_path / "stock.safetensors"
    save_file({k: v.contiguous() for k, v in stock.state_dict().items()}, str(path))
    m = build_model("torchvision:mobilenet_v3_small", 10, in_channels=1, input_size=(64, 64), weights=str(path))
    assert m.classifier[-1].out_features == 10
    torch.testing.assert_close(m.features[0][0].weight, stock.features[0][0].weight.sum(1, keepdim=True))
    assert m.eval()(torch.randn(2, 1, 64, 64)).shape == (2, 10)


def test_torchvision_own_checkpoint_round_trip(tmp_path):
    a = build_model("torchvision:resnet18", 10, in_channels=1, input_size=(32, 32)).eval()
    path = tmp_path / "student.safetensors"
    save_file(a.state_dict(), str(path))
    b = build_model("torchvision:resnet18", 10, in_channels=1, input_size=(32, 32), weights=str(path)).eval()
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(a(x), b(x))


def test_torchvision_bad_weights_name():
    with pytest.raises(ValueError, match="Invalid weights 'NOPE'.*IMAGENET1K_V1"):
        build_model("torchvision:resnet18", 10, in_channels=3, input_size=(32, 32), weights="NOPE")


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x)).mean(dim=(2, 3)))


def _tiny() -> Tiny:
    torch.manual_seed(0)
    m = Tiny()
    m.bn.running_mean.uniform_(-1, 1)  # non-default buffers, so losing them would show
    return m.eval()


def test_pt2_round_trip(tmp_path):
    m = _tiny()
    x = torch.randn(3, 1, 28, 28)
    ep = torch.export.export(m, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    path = tmp_path / "teacher.pt2"
    torch.export.save(ep, str(path))
    loaded = build_model(str(path), 5, in_channels=1, input_size=(28, 28))
    loaded.eval()  # a raw exported GraphModule would raise NotImplementedError here
    torch.testing.assert_close(loaded(x), m(x))
    assert loaded(torch.randn(7, 1, 28, 28)).shape == (7, 5)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
@pytest.mark.parametrize("suffix", [".pt", ".ts"])
def test_torchscript_round_trip(tmp_path, suffix):
    m = _tiny()
    x = torch.randn(3, 1, 28, 28)
    path = tmp_path / f"teacher{suffix}"
    torch.jit.trace(m, x).save(str(path))
    loaded = build_model(str(path), None, in_channels=1, input_size=(28, 28)).eval()
    torch.testing.assert_close(loaded(x), m(x))
    assert num_classes_of(loaded, (28, 28), 1) == 5


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_file_model_checks_classes_and_refuses_extra_weights(tmp_path):
    path = tmp_path / "t.pt"
    torch.jit.trace(_tiny(), torch.randn(2, 1, 28, 28)).save(str(path))
    with pytest.raises(ValueError, match="outputs 5 classes, expected num_classes=10"):
        build_model(str(path), 10, in_channels=1, input_size=(28, 28))
    with pytest.raises(ValueError, match="carries its own weights"):
        build_model(str(path), 5, in_channels=1, input_size=(28, 28), weights="w.safetensors")
    with pytest.raises(FileNotFoundError):
        build_model(str(tmp_path / "missing.pt2"), 5, in_channels=1, input_size=(28, 28))


def test_safetensors_and_weights_only_loading(tmp_path):
    m = build_model("streamkd:lenet5", 10, in_channels=1, input_size=(28, 28))
    sd = m.state_dict()
    st = tmp_path / "w.safetensors"
    save_file(sd, str(st))
    pt = tmp_path / "w.pt"
    torch.save({"state_dict": sd, "epoch": 3}, pt)
    ddp = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in sd.items()}, ddp)
    for path in (st, pt, ddp):
        got = load_state_dict_file(path)
        assert got.keys() == sd.keys()
        for k in sd:
            assert torch.equal(got[k], sd[k])
    b = build_model("streamkd:lenet5", 10, in_channels=1, input_size=(28, 28), weights=str(pt))
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(b(x), m(x))


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_arbitrary_pickle_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"conv.weight": Evil()}, path)  # loading it unrestricted would call print()
    with pytest.raises(ValueError, match="refusing to load"):
        load_state_dict_file(path)
    assert "pwned" not in capsys.readouterr().out
    with pytest.raises(ValueError, match="refusing to load"):
        build_model("streamkd:lenet5", 10, in_channels=1, input_size=(28, 28), weights=str(path))


def test_non_tensor_dict_and_mismatched_weights(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"lr": 0.1}, path)
    with pytest.raises(ValueError, match="name -> tensor"):
        load_state_dict_file(path)
    other = tmp_path / "other.safetensors"
    save_file(build_model("streamkd:lenet5", 3, in_channels=1, input_size=(28, 28)).state_dict(), str(other))
    with pytest.raises(ValueError, match="do not fit 'streamkd:lenet5'"):
        build_model("streamkd:lenet5", 10, in_channels=1, input_size=(28, 28), weights=str(other))


@pytest.mark.parametrize("spec", ["x", "streamkd:resnet", "keras:lenet5", "torchvision:not_a_net", "model.onnx"])
def test_unknown_spec(spec):
    with pytest.raises(ValueError) as e:
        build_model(spec, 10, in_channels=1, input_size=(28, 28))
    assert str(e.value).startswith(
        f"Invalid model {spec!r}. Valid: streamkd:lenet5, streamkd:fmnist_cnn, torchvision:<name>, <file>.pt2|.pt|.ts"
    )


def test_unknown_torchvision_name_lists_choices():
    with pytest.raises(ValueError, match="resnet18"):
        build_model("torchvision:not_a_net", 10, in_channels=3, input_size=(32, 32))


def test_file_sha256(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    assert file_sha256(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_shipped_teacher_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="streamkd train-teacher"):
        shipped_teacher_weights(tmp_path)
    (tmp_path / "fmnist_cnn.safetensors").write_bytes(b"x")
    assert shipped_teacher_weights(tmp_path) == tmp_path / "fmnist_cnn.safetensors"
    assert models.shipped_teacher_weights.__defaults__[0].name == "weights"


def test_shipped_teacher_matches_its_manifest():
    try:
        path = shipped_teacher_weights()
    except FileNotFoundError:
        pytest.skip("shipped teacher weights not trained yet (streamkd train-teacher)")
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["sha256"] == file_sha256(path)
    assert manifest["architecture"] == models.TEACHER_SPEC
    assert manifest["test_acc"] >= 0.93
    m = build_model(models.TEACHER_SPEC, 10, in_channels=1, input_size=(28, 28), weights=str(path))
    assert num_classes_of(m, (28, 28), 1) == 10


def test_torchvision_weights_enum_resolved_then_adapted(monkeypatch):
    import torchvision

    real = torchvision.models.get_model
    calls = []

    def fake(name, **kwargs):  # stands in for the hub download: a stock net, no network
        calls.append(kwargs)
        return real(name)

    monkeypatch.setattr(torchvision.models, "get_model", fake)
    m = build_model("torchvision:resnet18", 10, in_channels=1, input_size=(32, 32), weights="DEFAULT")
    assert calls[-1]["weights"] is torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    assert m.fc.out_features == 10 and m.conv1.in_channels == 1

    def offline(name, **kwargs):
        import urllib.error

        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(RuntimeError, match="could not fetch torchvision weights .*IMAGENET1K_V1"):
        build_model("torchvision:resnet18", 10, in_channels=3, input_size=(32, 32), weights="IMAGENET1K_V1")
