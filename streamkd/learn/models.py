"""Model specs, the built-in networks, and safe weight loading.

A spec names a model: ``streamkd:lenet5``, ``streamkd:fmnist_cnn``,
``torchvision:<name>``, or a file (``.pt2`` torch.export program,
``.pt``/``.ts`` TorchScript) for a teacher of any architecture. Weights load
from safetensors or ``torch.load(weights_only=True)``, never from unrestricted
pickle.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

TEACHER_SPEC = "streamkd:fmnist_cnn"
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)
FILE_SUFFIXES = (".pt2", ".pt", ".ts")
VALID_SPECS = "streamkd:lenet5, streamkd:fmnist_cnn, torchvision:<name>, <file>.pt2|.pt|.ts"


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max-pool; float N×C×H×W (H, W >= 28) -> logits N×num_classes.

    conv1 has padding=2 so a 28 px input sees the classic 32 px geometry; an
    adaptive pool pins the flatten size at 16·5·5 for any larger input. Built
    for ``input_size`` 28×28, where the features already are 5×5, it leaves
    that pool out. Each max-pool comes before its ReLU: the same function as
    ReLU then pool, with the ReLU on a quarter of the values.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1,
                 input_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.MaxPool2d(2), nn.ReLU(inplace=True),
            nn.Conv2d(6, 16, 5), nn.MaxPool2d(2), nn.ReLU(inplace=True),
        )
        five = input_size is not None and all((s // 2 - 4) // 2 == 5 for s in input_size)
        self.pool = nn.Identity() if five else nn.AdaptiveAvgPool2d((5, 5))
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120), nn.ReLU(inplace=True),
            nn.Linear(120, 84), nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    # bias=False: BatchNorm's shift makes a conv bias redundant
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class FmnistCNN(nn.Module):
    """The shipped teacher: VGG-style, 3×3 conv+BN+ReLU [64,64,M,128,128,M,256,256,M], GAP, dropout, FC.

    float N×C×H×W (any H, W >= 8) -> logits N×num_classes; ~1.15 M parameters.
    The global average pool makes it size-agnostic (28 px and 32 px alike), so
    ``input_size`` changes nothing.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, dropout: float = 0.3,
                 input_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(in_channels, 64), *_conv_bn(64, 64), nn.MaxPool2d(2),
            *_conv_bn(64, 128), *_conv_bn(128, 128), nn.MaxPool2d(2),
            *_conv_bn(128, 256), *_conv_bn(256, 256), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(256, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Global average pool as a mean, not nn.AdaptiveAvgPool2d: its CUDA
        # backward uses atomics, so it is not deterministic.
        return self.classifier(self.features(x).mean(dim=(2, 3)))


BUILTINS: dict[str, Callable[..., nn.Module]] = {"lenet5": LeNet5, "fmnist_cnn": FmnistCNN}


class ExportedModule(nn.Module):
    """Wraps a torch.export program's module so ``.eval()``/``.train()`` work.

    An exported graph has its train/eval behaviour baked in at export time,
    and its GraphModule raises NotImplementedError on ``.eval()``; here those
    calls only set the flag, so callers can treat it like any other model.
    """

    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        self.program = program

    def forward(self, *args, **kwargs):
        return self.program(*args, **kwargs)

    def train(self, mode: bool = True) -> ExportedModule:
        self.training = mode
        return self


def _invalid(spec: str, extra: str = "") -> ValueError:
    return ValueError(f"Invalid model {spec!r}. Valid: {VALID_SPECS}{extra}")


def build_model(
    spec: str,
    num_classes: int | None,
    *,
    in_channels: int,
    input_size: tuple[int, int],
    weights: str | None = None,
) -> nn.Module:
    """Build the model a spec names, on CPU, in training mode.

    Args:
        spec: ``streamkd:lenet5`` | ``streamkd:fmnist_cnn`` | ``torchvision:<name>``
            | a ``.pt2`` (torch.export) or ``.pt``/``.ts`` (TorchScript) file.
        num_classes: output width; None = the model's own (10 for built-ins).
            For file models it is checked against a dry forward.
        in_channels: 1 or 3 image channels the model will receive.
        input_size: (H, W) in pixels the model will receive (used for checks).
        weights: a state-dict file (``.safetensors`` or weights_only
            ``torch.load``), or for torchvision a weights enum name such as
            ``DEFAULT`` / ``IMAGENET1K_V1`` (resolved through torchvision,
            which downloads into its hub cache). File models carry their own
            weights, so it must be None for them.
    """
    if spec.endswith(FILE_SUFFIXES):
        return _build_file_model(spec, num_classes, in_channels, input_size, weights)
    scheme, _, name = spec.partition(":")
    if scheme == "streamkd" and name in BUILTINS:
        model = BUILTINS[name](num_classes=num_classes or 10, in_channels=in_channels, input_size=input_size)
        if weights is not None:
            _load_weights_file(model, weights, spec)
        return model
    if scheme == "torchvision" and name:
        return _build_torchvision(spec, name, num_classes, in_channels, weights)
    raise _invalid(spec)


def _load_weights_file(model: nn.Module, path: str | Path, spec: str) -> None:
    if not Path(path).is_file():
        raise FileNotFoundError(f"weights file for {spec!r} not found: {path}")
    try:
        model.load_state_dict(load_state_dict_file(path))
    except RuntimeError as e:  # missing/unexpected keys or shape mismatches
        raise ValueError(f"weights {path} do not fit {spec!r}: {e}") from e


def _build_file_model(
    spec: str, num_classes: int | None, in_channels: int, input_size: tuple[int, int], weights: str | None
) -> nn.Module:
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {spec}")
    if weights is not None:
        raise ValueError(f"model file {spec!r} carries its own weights; weights must be empty, got {weights!r}")
    if path.suffix == ".pt2":
        model: nn.Module = ExportedModule(torch.export.load(str(path)).module())
    else:
        model = torch.jit.load(str(path), map_location="cpu")
    if num_classes is not None:
        got = num_classes_of(model, input_size, in_channels)
        if got != num_classes:
            raise ValueError(f"model file {spec!r} outputs {got} classes, expected num_classes={num_classes}")
    return model


def _build_torchvision(
    spec: str, name: str, num_classes: int | None, in_channels: int, weights: str | None
) -> nn.Module:
    import torchvision

    valid = torchvision.models.list_models(module=torchvision.models)
    if name not in valid:
        raise _invalid(spec, f" (torchvision classification models: {', '.join(valid)})")

    if weights is not None and not Path(weights).is_file() and re.fullmatch(r"[A-Z][A-Z0-9_]*", weights):
        # A weights enum name: build the pretrained net, then adapt head and stem.
        enum = torchvision.models.get_model_weights(name)
        try:
            resolved = enum[weights]
        except KeyError:
            choices = ", ".join(enum.__members__)  # includes the DEFAULT alias
            raise ValueError(f"Invalid weights {weights!r} for {spec!r}. Valid: {choices} or a file") from None
        try:
            model = torchvision.models.get_model(name, weights=resolved)
        except OSError as e:  # offline: torchvision downloads into its hub cache
            raise RuntimeError(
                f"could not fetch torchvision weights {resolved} for {spec!r} ({e}); "
                "pre-seed the torch hub cache or pass a weights file"
            ) from e
        return _adapt(model, spec, num_classes, in_channels, pretrained=True)

    kwargs = {"num_classes": num_classes} if num_classes is not None else {}
    model = _adapt(torchvision.models.get_model(name, **kwargs), spec, None, in_channels, pretrained=False)
    if weights is not None:
        try:
            _load_weights_file(model, weights, spec)
        except ValueError as first:
            # The file may be a stock checkpoint (3 channels, original head):
            # load it into the stock net, then adapt it like a pretrained one.
            stock = torchvision.models.get_model(name)
            try:
                _load_weights_file(stock, weights, spec)
            except ValueError:
                raise first from None
            model = _adapt(stock, spec, num_classes, in_channels, pretrained=True)
    return model


def _adapt(model: nn.Module, spec: str, num_classes: int | None, in_channels: int, pretrained: bool) -> nn.Module:
    """Replace the classifier head (last Linear) and the stem (first Conv2d) when they do not fit."""
    if num_classes is not None:
        name, head = _last(model, nn.Linear)
        if head is None:
            raise ValueError(f"{spec!r}: no Linear classifier head found to resize to {num_classes} classes")
        if head.out_features != num_classes:
            _set_submodule(model, name, nn.Linear(head.in_features, num_classes, bias=head.bias is not None))
    if in_channels != 3:
        name, stem = _first_conv(model)
        if stem is None or stem.in_channels != 3 or stem.groups != 1:
            raise ValueError(f"{spec!r}: cannot adapt the first layer to {in_channels} input channels")
        new = nn.Conv2d(
            in_channels, stem.out_channels, stem.kernel_size, stem.stride, stem.padding,
            stem.dilation, 1, stem.bias is not None, stem.padding_mode,
        )
        if pretrained:
            with torch.no_grad():
                # Keep the pretrained filters' response to a grey image: sum the
                # RGB taps, then share that sum equally among the new channels.
                w = stem.weight.sum(dim=1, keepdim=True)
                new.weight.copy_(w.repeat(1, in_channels, 1, 1) / in_channels)
                if stem.bias is not None:
                    new.bias.copy_(stem.bias)
        _set_submodule(model, name, new)
        if getattr(model, "transform_input", False):
            model.transform_input = False  # inception/googlenet re-normalise 3 RGB planes in forward
    return model


def _last(model: nn.Module, kind: type) -> tuple[str, nn.Module | None]:
    found: tuple[str, nn.Module | None] = ("", None)
    for name, m in model.named_modules():
        if isinstance(m, kind):
            found = (name, m)
    return found


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d | None]:
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name, m
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv3d)):
            return name, None  # something else sees the input first
    return "", None


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict: ``.safetensors``, else ``torch.load(weights_only=True)`` on CPU.

    Accepts a plain tensor dict or one nested under "state_dict"/"model", and
    strips a "module."/"_orig_mod." prefix (DDP / torch.compile checkpoints).
    Raises ValueError for anything that is not tensors, including pickles
    of arbitrary objects, which are never unpickled.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path}: refusing to load: not a plain tensor state dict (weights_only=True rejected it; "
            f"arbitrary pickles are never loaded). {str(e).splitlines()[-1] if str(e) else ''}".rstrip()
        ) from e
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ValueError(f"{path}: expected a dict of name -> tensor, got {type(obj).__name__}")
    for prefix in ("module.", "_orig_mod."):
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def num_classes_of(model: nn.Module, input_size: tuple[int, int], in_channels: int) -> int:
    """Output width K from a dry forward of a zero batch 2×in_channels×H×W on the model's device.

    Runs in eval mode (so BatchNorm statistics are untouched) and restores the mode.
    """
    ref = next(iter(model.parameters()), None)
    if ref is None:
        ref = next(iter(model.buffers()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            # batch 2, not 1: a program exported with a dynamic batch dim may not accept 1
            out = model(torch.zeros(2, in_channels, *input_size, device=device))
    except Exception as e:
        shape = f"2×{in_channels}×{input_size[0]}×{input_size[1]}"
        raise ValueError(f"model does not accept a float {shape} input: {e}") from e
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ValueError(f"model must return N×K logits, got {getattr(out, 'shape', type(out))}")
    return int(out.shape[1])


def shipped_teacher_weights(weights_dir: Path = WEIGHTS_DIR) -> Path:
    """Path of the shipped teacher weights (``fmnist_cnn.safetensors``; manifest beside it as ``.json``)."""
    path = weights_dir / "fmnist_cnn.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"shipped teacher weights missing: {path} (make them with `streamkd train-teacher`)")
    return path
