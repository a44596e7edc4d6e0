"""Quality benchmark: how good does the distilled student get from one unlabelled pass?

1. Streams the Fashion-MNIST train split (seeded order, no label headers) as PNG
   records into an embedded broker (one partition, so the order is exact).
2. Runs the real daemon loop (``streamkd.daemon``) over it: Kafka -> decode ->
   shipped teacher -> LeNet-5 student, one pass.
3. Baseline, same run: the same student (same init), the same order, batch size,
   optimizer and single pass, trained online on the ground-truth labels with
   plain cross-entropy and no teacher (the same ``Learner`` code with alpha=0).
4. Evaluates teacher, student and baseline on the 10,000 test images.

Last line of output: one JSON object (see the README "Results").
Usage: python bench/fashion_mnist.py [--limit N] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=60_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--set", action="append", default=[], help="config overrides for the daemon (and baseline)")
    args = ap.parse_args()

    from streamkd import daemon
    from streamkd.commands.broker import EmbeddedBroker, ensure_topics
    from streamkd.commands.datasets import load_fashion_mnist
    from streamkd.commands.produce import dataset_records, produce
    from streamkd.config import load_config
    from streamkd.learn.evaluation import evaluate
    from streamkd.learn.learner import Learner

    images, labels = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    order = np.random.default_rng(args.seed).permutation(len(images))[: args.limit]
    n = len(order)

    import tempfile

    state = tempfile.mkdtemp(prefix="streamkd-bench-")
    with EmbeddedBroker() as broker:
        topic = "fmnist-bench"
        ensure_topics(broker.bootstrap, {topic: 1})
        t0 = time.monotonic()
        produce(dataset_records(images, None, "png", order), broker.bootstrap, topic, progress=False, total=n)
        produce_s = time.monotonic() - t0
        print(f"produced {n} unlabelled PNG records in {produce_s:.1f} s", file=sys.stderr)

        overrides = [f"kafka.bootstrap_servers={broker.bootstrap}", f"kafka.topic={topic}",
                     f"checkpoint.dir={state}/ckpt", f"snapshot.dir={state}/snap", "metrics.port=0",
                     f"train.device={args.device}", "train.agreement_window=1000000000",
                     "logging.progress_every_s=30", *args.set]
        cfg = load_config(None, overrides, env={})
        parts = daemon.build(cfg)
        stop = threading.Event()
        t1 = time.monotonic()
        prog = daemon.run(parts, stop, stop_when=lambda p: p.records_done >= n)
        seconds = time.monotonic() - t1

    dev = parts.device
    student = parts.learner.student.eval()
    teacher_acc = evaluate(parts.teacher.model, test_x, test_y, parts.teacher.spec, device=dev)["acc"]
    student_acc = evaluate(student, test_x, test_y, parts.learner.spec, device=dev)["acc"]

    # Baseline: identical student init (build() seeds identically), order, batches, optimizer; labels, no teacher.
    base_cfg = load_config(None, overrides + ["train.alpha=0.0"], env={})
    base = daemon.build(base_cfg)
    learner: Learner = base.learner
    k = parts.num_classes
    bs = cfg.train.batch_size
    for i in range(0, n, bs):
        idx = torch.as_tensor(order[i:i + bs])
        x = images[idx].to(dev)
        y = labels[idx].to(dev)
        # alpha=0 and every sample labelled: the loss is plain cross-entropy; these logits are unused.
        learner.step(x, torch.zeros(len(idx), k, device=dev), y)
    baseline_acc = evaluate(learner.student.eval(), test_x, test_y, learner.spec, device=dev)["acc"]

    result = {
        "teacher_acc": round(teacher_acc, 4),
        "student_acc": round(student_acc, 4),
        "student_over_teacher": round(student_acc / teacher_acc, 4),
        "baseline_acc": round(baseline_acc, 4),
        "student_acc_minus_baseline": round(student_acc - baseline_acc, 4),
        "agreement": round(prog.agreement, 4) if prog.agreement is not None else None,
        "images_per_s": round(prog.samples_seen / seconds, 1),
        "seconds": round(seconds, 1),
        "images": prog.samples_seen,
        "device": str(dev),
        "batch_size": bs,
        "lr": cfg.train.lr,
        "temperature": cfg.train.temperature,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
