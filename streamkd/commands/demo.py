"""``streamkd demo``: the whole idea on one machine, with nothing to set up.

Starts the embedded broker, streams the Fashion-MNIST train split into it as
PNG records *without* labels, distils the shipped teacher into a LeNet-5
student with the real daemon loop, serves the metrics and snapshot
endpoints, then evaluates teacher and student on the 10,000 test images.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="embedded broker + Fashion-MNIST stream + shipped teacher -> student")
    p.add_argument("--limit", type=int, default=60_000, help="images per pass (default: the whole train split)")
    p.add_argument("--passes", type=int, default=1, help="passes over the stream (default 1)")
    p.add_argument("--keep-running", action="store_true",
                   help="after the stream is consumed, keep serving metrics and snapshots until Ctrl-C")
    p.add_argument("--port", type=int, default=9400, help="HTTP port for /metrics and /v1/snapshots (0: any)")
    p.add_argument("--state-dir", type=Path, help="checkpoints and snapshots (default: a new temporary folder)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="stream order")
    p.add_argument("--data-dir", help="where Fashion-MNIST lives (default: Debian's, then a download cache)")
    p.add_argument("--format", choices=["png", "jpeg", "webp", "npy"], default="png")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config override")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    p.set_defaults(func=_main)


def demo_config(bootstrap: str, topic: str, state: Path, args: argparse.Namespace):
    from streamkd.config import load_config

    overrides = [
        f"kafka.bootstrap_servers={bootstrap}", f"kafka.topic={topic}", f"kafka.dlq_topic={topic}.dlq",
        "kafka.group_id=streamkd-demo", f"checkpoint.dir={state / 'checkpoints'}",
        f"snapshot.dir={state / 'snapshots'}", "snapshot.every_steps=200", "snapshot.every_seconds=30",
        f"metrics.port={args.port}", f"train.device={args.device}", f"train.batch_size={args.batch_size}",
        "logging.progress_every_s=30", *args.set,
    ]
    return load_config(None, overrides, env={})


def _main(args: argparse.Namespace) -> int:
    from streamkd.commands.broker import EmbeddedBroker, ensure_topics
    from streamkd.commands.datasets import load_fashion_mnist
    from streamkd.commands.produce import dataset_records, make_producer, produce
    from streamkd.logs import setup_logging
    from streamkd.shutdown import install_stop_handlers

    setup_logging("text", "WARNING" if not args.no_progress else "INFO")
    images, labels = load_fashion_mnist("train", args.data_dir)
    test_images, test_labels = load_fashion_mnist("test", args.data_dir)
    n = min(args.limit, len(images))
    total = n * args.passes
    state = args.state_dir or Path(tempfile.mkdtemp(prefix="streamkd-demo-"))
    state.mkdir(parents=True, exist_ok=True)

    from streamkd import daemon

    with EmbeddedBroker() as broker:
        topic = "fashion-mnist"
        ensure_topics(broker.bootstrap, {topic: 3, f"{topic}.dlq": 1})
        cfg = demo_config(broker.bootstrap, topic, state, args)
        parts = daemon.build(cfg)
        print(f"streamkd demo: broker {broker.bootstrap}, {total} unlabelled images "
              f"({args.passes} pass{'es' if args.passes > 1 else ''} of {n}), device {parts.device}, "
              f"teacher {cfg.teacher.model}, student {cfg.student.model}")

        # The producer streams while the daemon trains, as a camera or a pipeline would.
        producer_error: list[BaseException] = []

        def stream() -> None:
            try:
                producer = make_producer(broker.bootstrap)
                rng = np.random.default_rng(args.seed)
                for _ in range(args.passes):
                    order = rng.permutation(len(images))[:n]
                    produce(dataset_records(images, None, args.format, order), broker.bootstrap, topic,
                            progress=False, producer=producer)
                producer.close()
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                producer_error.append(e)

        producer_thread = threading.Thread(target=stream, name="demo-producer", daemon=True)
        stop = threading.Event()
        disarm = install_stop_handlers(stop, cfg.train.shutdown_grace_s)
        bar = _Bar(total, enabled=not args.no_progress)
        done = threading.Event()
        t0 = time.monotonic()
        final: list = []

        def on_progress(p) -> None:
            bar.update(p)
            if p.records_done >= total and not done.is_set():
                done.set()

        def stop_when(p) -> bool:
            return (p.records_done >= total and not args.keep_running) or bool(producer_error)

        def run_daemon() -> None:
            final.append(daemon.run(parts, stop, on_progress=on_progress, stop_when=stop_when))

        runner = threading.Thread(target=run_daemon, name="daemon")
        runner.start()
        producer_thread.start()
        while runner.is_alive() and not done.is_set():
            runner.join(0.2)
        seconds = time.monotonic() - t0
        if args.keep_running and runner.is_alive():
            bar.close()
            _report(parts, test_images, test_labels, state, seconds, total, None)
            print(f"\nstill running: metrics at http://{cfg.metrics.host}:{cfg.metrics.port}/metrics, newest "
                  f"snapshot at http://{cfg.metrics.host}:{cfg.metrics.port}/v1/snapshots/latest, broker "
                  f"{broker.bootstrap} (topic {topic}). Ctrl-C to stop.")
            while runner.is_alive():
                runner.join(0.5)
            disarm()
            return 0
        runner.join()
        disarm()  # the loop stopped cleanly: the evaluation below is not shutdown work
        bar.close()
        if producer_error:
            raise RuntimeError(f"the demo producer failed: {producer_error[0]}")
        if not final:
            return 1
        if final[0].records_done < total:
            print(f"stopped early after {final[0].records_done} of {total} images")
        _report(parts, test_images, test_labels, state, seconds, final[0].records_done, final[0])
    return 0


def _report(parts, test_images, test_labels, state: Path, seconds: float, records: int, prog) -> None:
    from streamkd.learn.evaluation import agreement, evaluate

    device = parts.device
    teacher_acc = evaluate(parts.teacher.model, test_images, test_labels, parts.teacher.spec, device=device)["acc"]
    student = parts.learner.student
    was_training = student.training
    student.eval()
    try:
        student_acc = evaluate(student, test_images, test_labels, parts.learner.spec, device=device)["acc"]
        test_agree = agreement(student, parts.teacher.model, test_images, parts.learner.spec, parts.teacher.spec,
                               device=device)["agreement"]
    finally:
        student.train(was_training)
    latest = parts.snapshots.latest()
    preq = prog.agreement if prog is not None else None
    rows = [
        ("teacher accuracy (test, 10k)", f"{teacher_acc:.4f}"),
        ("student accuracy (test, 10k)", f"{student_acc:.4f}"),
        ("student / teacher", f"{student_acc / teacher_acc:.3f}"),
        ("agreement on test", f"{test_agree:.4f}"),
        ("prequential agreement (stream)", f"{preq:.4f}" if preq is not None else "-"),
        ("images", f"{records}"),
        ("images/s", f"{records / seconds:.0f}"),
        ("seconds", f"{seconds:.1f}"),
        ("snapshots", f"{parts.snapshots.directory} (newest v{latest['version'] if latest else '-'})"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\nstreamkd demo result")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


class _Bar:
    """tqdm bar over images with the loop's live figures."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="img", disable=not enabled, dynamic_ncols=True, smoothing=0.1)
        self.last = 0
        self.last_post = 0.0

    def update(self, p) -> None:
        if p.records_done > self.last:
            self.bar.update(p.records_done - self.last)
            self.last = p.records_done
        now = time.monotonic()
        if now - self.last_post > 0.5:
            self.last_post = now
            agree = f"{p.agreement:.3f}" if p.agreement is not None else "-"
            self.bar.set_postfix_str(f"agree {agree} kd {p.kd_loss:.3f} step {p.step}", refresh=False)

    def close(self) -> None:
        self.bar.close()
