"""``streamkd train-teacher``: train the shipped Fashion-MNIST teacher (``streamkd:fmnist_cnn``).

The whole dataset lives on the device as one uint8 tensor (47 MB) and is
augmented there, so there is no DataLoader: an epoch on a GPU is a few
seconds. The recipe: SGD (Nesterov, momentum 0.9, weight decay 5e-4) with a
one-cycle LR, label smoothing 0.1, random flip + shift (pad 2) + erasing,
bf16 autocast on CUDA. Seeded and deterministic: the same seed on the same
device type and torch build gives the same weights.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from streamkd.commands.datasets import DatasetNotFound, load_fashion_mnist
from streamkd.learn.device import autocast, resolve_device
from streamkd.learn.evaluation import evaluate
from streamkd.learn.learner import InputSpec, resolve_precision
from streamkd.learn.models import FMNIST_MEAN, FMNIST_STD, TEACHER_SPEC, WEIGHTS_DIR, build_model, file_sha256

# Written into the current directory unless asked otherwise: the package's own weights (what
# `teacher.weights` defaults to) are replaced only with --into-package.
DEFAULT_OUT = Path("teacher.safetensors")
PACKAGE_OUT = WEIGHTS_DIR / "fmnist_cnn.safetensors"
DEFAULTS = {"epochs": 30, "batch_size": 256, "lr": 0.1, "seed": 0}
WEIGHT_DECAY = 5e-4
LABEL_SMOOTHING = 0.1
NUM_CLASSES = 10
TEST_SPEC = InputSpec((28, 28), 1, FMNIST_MEAN, FMNIST_STD)  # the test images as they are


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 2, erase_p: float = 0.5) -> torch.Tensor:
    """Random horizontal flip, random shift by up to ``pad`` px, random erasing.

    x: float N×C×H×W in [0, 1] on any device; returns the same shape. All
    randomness comes from ``gen`` (a generator on x's device). Erased
    patches are filled with the dataset mean (0 after normalisation).
    """
    n, c, h, w = x.shape
    dev = x.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen, device=dev)

    x = torch.where(rand(n, 1, 1, 1) < 0.5, x.flip(-1), x)

    # Shift = zero-pad (0 is the background) then crop at a random offset. Two
    # gathers instead of a per-sample loop; gather without grad is deterministic.
    xp = nn.functional.pad(x, (pad, pad, pad, pad))
    dy = (rand(n) * (2 * pad + 1)).long()
    dx = (rand(n) * (2 * pad + 1)).long()
    rows = (dy[:, None] + torch.arange(h, device=dev)).view(n, 1, h, 1).expand(n, c, h, w + 2 * pad)
    xp = xp.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w, device=dev)).view(n, 1, 1, w).expand(n, c, h, w)
    x = xp.gather(3, cols)

    x = (x - FMNIST_MEAN[0]) / FMNIST_STD[0]

    # Random erasing (Zhong et al. 2017): area 2-20 % of the image, aspect 0.3-3.3.
    area = (0.02 + 0.18 * rand(n)) * h * w
    aspect = torch.exp(math.log(0.3) + (math.log(3.3) - math.log(0.3)) * rand(n))
    eh = (area * aspect).sqrt().clamp(max=h)
    ew = (area / aspect).sqrt().clamp(max=w)
    y0 = rand(n) * (h - eh)
    x0 = rand(n) * (w - ew)
    ys = torch.arange(h, device=dev).view(1, h, 1)
    xs = torch.arange(w, device=dev).view(1, 1, w)
    box = ((ys >= y0.view(n, 1, 1)) & (ys < (y0 + eh).view(n, 1, 1))
           & (xs >= x0.view(n, 1, 1)) & (xs < (x0 + ew).view(n, 1, 1)))
    erase = box & (rand(n) < erase_p).view(n, 1, 1)
    return x.masked_fill(erase.unsqueeze(1), 0.0)


def smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Mean CE against (1 − ε)·one_hot + ε/K; logits N×K, labels int64 N.

    Written out instead of F.cross_entropy because CUDA's nll_loss is not
    deterministic (torch.use_deterministic_algorithms flags it).
    """
    logp = logits.float().log_softmax(dim=1)
    k = logits.shape[1]
    one_hot = (labels[:, None] == torch.arange(k, device=labels.device)).float()
    target = one_hot * (1.0 - smoothing) + smoothing / k
    return -(target * logp).sum(dim=1).mean()


def train_one_epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    order_gen: torch.Generator,
    aug_gen: torch.Generator,
) -> float:
    """One pass in a seeded random order; returns the mean training loss."""
    model.train()
    n = len(images)
    perm = torch.randperm(n, generator=order_gen).to(images.device)  # CPU generator: same order on any device
    loss_sum = torch.zeros((), device=images.device)
    seen = 0
    for i in range(0, n, batch_size):
        idx = perm[i:i + batch_size]
        if len(idx) < 2:
            continue  # BatchNorm cannot train on a single sample
        x = augment(images[idx].float() / 255, aug_gen)
        with autocast(images.device, resolve_precision("auto", images.device)):  # bf16 on CUDA, fp32 on CPU
            logits = model(x)
        loss = smoothed_cross_entropy(logits, labels[idx], LABEL_SMOOTHING)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_sum += loss.detach() * len(idx)  # stays on the device: no per-step sync
        seen += len(idx)
    return loss_sum.item() / max(seen, 1)


@contextlib.contextmanager
def _deterministic(dev: torch.device) -> Iterator[None]:
    """Deterministic kernels for the duration of training; restores the global flags after."""
    if dev.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS determinism, read at handle creation
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)  # warn, not fail, if a kernel has no deterministic variant
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


def train_teacher(
    out: Path,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: str,
    limit: int | None,
    log: Callable[[str], None],
    data_dir: str | Path | None = None,
    command: str | None = None,
) -> dict:
    """Train ``streamkd:fmnist_cnn`` on Fashion-MNIST train; write weights and manifest.

    Writes ``out`` (safetensors, CPU fp32 weights + BatchNorm buffers) and
    ``out.with_suffix(".json")`` (the manifest), each atomically, and
    returns the manifest. ``limit`` keeps the first N train *and* test
    images (quick runs). ``lr`` is the one-cycle peak. ``command`` is
    recorded in the manifest (default: this process's argv).
    """
    if epochs < 1 or batch_size < 2 or not lr > 0 or (limit is not None and limit < 2):
        raise ValueError(f"need epochs >= 1, batch_size >= 2, lr > 0, limit >= 2; got "
                         f"epochs={epochs}, batch_size={batch_size}, lr={lr}, limit={limit}")
    dev = resolve_device(device)
    started = time.perf_counter()
    train_x, train_y = load_fashion_mnist("train", data_dir)
    test_x, test_y = load_fashion_mnist("test", data_dir)
    if limit is not None:
        train_x, train_y, test_x, test_y = train_x[:limit], train_y[:limit], test_x[:limit], test_y[:limit]
    train_x, train_y, test_x, test_y = (t.to(dev) for t in (train_x, train_y, test_x, test_y))

    history = []
    with _deterministic(dev):
        torch.manual_seed(seed)  # weight init and dropout
        model = build_model(TEACHER_SPEC, NUM_CLASSES, in_channels=1, input_size=(28, 28)).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=WEIGHT_DECAY)
        steps = epochs * sum(1 for i in range(0, len(train_x), batch_size) if len(train_x) - i >= 2)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
        order_gen = torch.Generator().manual_seed(seed)
        aug_gen = torch.Generator(device=dev).manual_seed(seed + 1)
        for epoch in range(1, epochs + 1):
            t0 = time.perf_counter()
            loss = train_one_epoch(model, opt, sched, train_x, train_y, batch_size, order_gen, aug_gen)
            t1 = time.perf_counter()
            acc = evaluate(model, test_x, test_y, TEST_SPEC, batch_size=1024, amp=resolve_precision("auto", dev))["acc"]
            secs, eval_secs = time.perf_counter() - t0, time.perf_counter() - t1
            history.append({"epoch": epoch, "train_loss": round(loss, 5), "test_acc": acc,
                            "seconds": round(secs, 2), "eval_seconds": round(eval_secs, 2)})
            log(f"epoch {epoch:3d}/{epochs}  train_loss {loss:.4f}  test_acc {acc:.4f}  "
                f"{secs:.1f}s (eval {eval_secs:.1f}s)")

    out = _write_weights(model, Path(out))
    manifest = _manifest(model, out, dev, history, len(train_x), len(test_x), epochs=epochs, batch_size=batch_size,
                         lr=lr, seed=seed, limit=limit, command=command, started=started)
    manifest_path = out.with_suffix(".json")
    tmp = manifest_path.with_name(manifest_path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, manifest_path)
    return manifest


def _write_weights(model: torch.nn.Module, out: Path) -> Path:
    """CPU fp32 weights and BatchNorm buffers to ``out`` (safetensors), atomically."""
    state = {k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in model.state_dict().items()}  # BN running stats and num_batches_tracked included
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(state, str(tmp), metadata={"architecture": TEACHER_SPEC})
    os.replace(tmp, out)  # readers never see a partial file
    return out


def _manifest(model: torch.nn.Module, out: Path, dev: torch.device, history: list[dict], train_samples: int,
              test_samples: int, *, epochs: int, batch_size: int, lr: float, seed: int, limit: int | None,
              command: str | None, started: float) -> dict:
    """What the weights file is: architecture, data, recipe, result, and how to reproduce it."""
    manifest = {
        "architecture": TEACHER_SPEC,
        "num_classes": NUM_CLASSES,
        "in_channels": 1,
        "input_size": [28, 28],
        "mean": list(FMNIST_MEAN),
        "std": list(FMNIST_STD),
        "params": sum(p.numel() for p in model.parameters()),
        "dataset": "fashion-mnist",
        "train_samples": train_samples,
        "test_samples": test_samples,
        "test_acc": history[-1]["test_acc"],
        "weights_file": out.name,
        "sha256": file_sha256(out),
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "limit": limit,
        "recipe": (f"SGD nesterov m=0.9 wd={WEIGHT_DECAY}, OneCycleLR(max_lr=lr, pct_start=0.15), "
                   f"label_smoothing={LABEL_SMOOTHING}, aug: hflip + shift(pad 2) + random erasing(p=0.5)"
                   + (", bf16 autocast" if dev.type == "cuda" else "")),
        "command": command if command is not None else shlex.join(sys.argv),
        "torch": torch.__version__,
        "device": dev.type,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "seconds": round(time.perf_counter() - started, 1),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "history": history,
    }
    return manifest


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``train-teacher`` subcommand; its ``func(args)`` returns the exit code."""
    p = subparsers.add_parser(
        "train-teacher",
        help="train the shipped Fashion-MNIST teacher (streamkd:fmnist_cnn)",
        description=__doc__.split("\n\n", 1)[1],
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, default=DEFAULT_OUT,
                       help="weights file; the manifest goes beside it as .json (default: %(default)s); use it "
                            "with teacher.weights")
    where.add_argument("--into-package", dest="out", action="store_const", const=PACKAGE_OUT,
                       help=f"replace the installed package's shipped teacher ({PACKAGE_OUT})")
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="default: %(default)s")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"],
                   help="one-cycle peak learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="default: %(default)s")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N train and test images (quick runs)")
    p.add_argument("--data-dir", default=None,
                   help="directory with the Fashion-MNIST IDX files (else $STREAMKD_DATA_DIR, Debian's, or a download)")
    p.set_defaults(func=_main)
    return p


def _main(args: argparse.Namespace) -> int:
    try:
        train_teacher(
            args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
            device=args.device, limit=args.limit, data_dir=args.data_dir,
            log=lambda line: print(line, flush=True),
            command=shlex.join(["streamkd", *sys.argv[1:]]),
        )
    except ValueError as e:
        print(f"streamkd train-teacher: {e}", file=sys.stderr)
        return 2
    except DatasetNotFound as e:
        print(f"streamkd train-teacher: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.json')}", flush=True)
    return 0
