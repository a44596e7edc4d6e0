"""Student training step alone, across precision / memory format / compile, to find what caps compute.

In the gpu preset of ``bench/throughput.py`` the compute ceiling is set by the mobilenet_v3_small step,
not by the resnet50 teacher (README "Results"). This times ``Learner.step`` -- the daemon's own
code -- on a device-resident batch with precomputed teacher logits, for each variant, in one run.
Last line: one JSON object, images/s per variant and the ratio of each to the first (the daemon's
defaults on that device).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def time_variant(model_spec: str, size: int, channels: int, batch: int, steps: int, device: torch.device,
                 precision: str, channels_last: bool, compile: str | None) -> float:
    """``compile``: None (eager) or a ``torch.compile`` mode; "reduce-overhead" adds CUDA graphs, which
    the daemon does not use yet -- measured here first."""
    from streamkd.config import TrainConfig
    from streamkd.learn.learner import InputSpec, Learner, resolve_precision
    from streamkd.learn.models import build_model

    torch.manual_seed(0)
    model = build_model(model_spec, 1000 if model_spec.startswith("torchvision:") else 10, in_channels=channels,
                        input_size=(size, size))
    spec = InputSpec((size, size), channels, (0.5,) * channels, (0.25,) * channels)
    cfg = dataclasses.replace(TrainConfig(), channels_last=channels_last)
    learner = Learner(model, spec, cfg, device, resolve_precision(precision, device), channels_last)
    if compile:
        learner.forward = torch.compile(learner.student, mode=compile)
    k = 1000 if model_spec.startswith("torchvision:") else 10
    x = torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8, device=device)
    logits = torch.randn(batch, k, device=device)
    y = torch.full((batch,), -1, dtype=torch.int64, device=device)
    for _ in range(5 if not compile else 10):  # compile, autotune, allocator
        learner.step(x, logits, y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(steps):
        learner.step(x, logits, y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batch * steps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="torchvision:mobilenet_v3_small")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    args = ap.parse_args()
    from streamkd.learn.learner import resolve_device

    device = resolve_device(args.device)
    variants = [("auto", True, None), ("fp32", True, None), ("auto", False, None), ("fp32", False, None)]
    if not args.no_compile:
        variants += [("auto", True, "default"), ("auto", False, "default")]
        if device.type == "cuda":
            variants += [("auto", True, "reduce-overhead")]
    result: dict = {"model": args.model, "size": args.size, "batch": args.batch,
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__}
    first = None
    for precision, cl, comp in variants:
        suffix = {None: "", "default": "_compile", "reduce-overhead": "_compile_cudagraphs"}[comp]
        name = f"{precision}{'_cl' if cl else ''}{suffix}"
        try:
            rate = time_variant(args.model, args.size, args.channels, args.batch, args.steps, device, precision,
                                cl, comp)
        except Exception as e:  # noqa: BLE001 - one failing variant (e.g. no compiler) must not hide the others
            log(f"{name}: failed ({type(e).__name__}: {e})")
            result[name] = None
            continue
        first = first or rate
        result[name] = round(rate, 1)
        result[name + "_ratio"] = round(rate / first, 3)
        log(f"{name:20s} {rate:10.0f} img/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
