"""``streamkd demo``: the whole idea on one machine, with nothing to set up.

Starts the embedded broker, streams the Fashion-MNIST train split into it as
PNG records *without* labels, distils the shipped teacher into a LeNet-5
student with the real daemon loop, serves the metrics and snapshot
endpoints, then evaluates the teacher and the served student (the newest snapshot: the EMA weights
with the defaults) on the 10,000 test images.
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
    from streamkd import daemon
    from streamkd.commands.broker import EmbeddedBroker, ensure_topics
    from streamkd.commands.datasets import load_fashion_mnist
    from streamkd.logs import setup_logging
    from streamkd.shutdown import install_stop_handlers

    setup_logging("text", "WARNING" if not args.no_progress else "INFO")
    images, _ = load_fashion_mnist("train", args.data_dir)
    test = load_fashion_mnist("test", args.data_dir)
    n = min(args.limit, len(images))
    total = n * args.passes
    state = args.state_dir or Path(tempfile.mkdtemp(prefix="streamkd-demo-"))
    state.mkdir(parents=True, exist_ok=True)
    with EmbeddedBroker() as broker:
        topic = "fashion-mnist"
        ensure_topics(broker.bootstrap, {topic: 3, f"{topic}.dlq": 1})
        cfg = demo_config(broker.bootstrap, topic, state, args)
        parts = daemon.build(cfg)
        print(f"streamkd demo: broker {broker.bootstrap}, {total} unlabelled images "
              f"({args.passes} pass{'es' if args.passes > 1 else ''} of {n}), device {parts.device}, "
              f"teacher {cfg.teacher.model}, student {cfg.student.model}")
        # The producer streams while the daemon trains, as a camera or a pipeline would.
        producer = _Producer(broker.bootstrap, topic, images, n, args)
        stop = threading.Event()
        disarm = install_stop_handlers(stop, cfg.train.shutdown_grace_s)
        bar = _Bar(total, enabled=not args.no_progress)
        done = threading.Event()
        final: list = []

        def on_progress(p) -> None:
            bar.update(p)
            if p.records_done >= total:
                done.set()

        def stop_when(p) -> bool:
            return (p.records_done >= total and not args.keep_running) or bool(producer.error)

        def run_daemon() -> None:
            final.append(daemon.run(parts, stop, on_progress=on_progress, stop_when=stop_when))

        runner = threading.Thread(target=run_daemon, name="daemon")
        t0 = time.monotonic()
        runner.start()
        producer.start()
        while runner.is_alive() and not done.is_set():
            runner.join(0.2)
        seconds = time.monotonic() - t0
        if args.keep_running and runner.is_alive():
            bar.close()
            _report(parts, test, state, seconds, total, None)
            print(f"\nstill running: metrics at http://{cfg.metrics.host}:{cfg.metrics.port}/metrics, newest "
                  f"snapshot at http://{cfg.metrics.host}:{cfg.metrics.port}/v1/snapshots/latest, broker "
                  f"{broker.bootstrap} (topic {topic}). Ctrl-C to stop.")
        runner.join()
        disarm()  # the loop stopped cleanly: the evaluation below is not shutdown work
        bar.close()
        if producer.error:
            raise RuntimeError(f"the demo producer failed: {producer.error[0]}")
        if not final:
            return 1
        if args.keep_running:
            return 0
        if final[0].records_done < total:
            print(f"stopped early after {final[0].records_done} of {total} images")
        _report(parts, test, state, seconds, final[0].records_done, final[0])
    return 0


class _Producer(threading.Thread):
    """Streams the train split (shuffled, ``--passes`` times) into the topic; an error is kept for the main thread."""

    def __init__(self, bootstrap: str, topic: str, images, n: int, args: argparse.Namespace):
        super().__init__(name="demo-producer", daemon=True)
        self.bootstrap, self.topic, self.images, self.n, self.args = bootstrap, topic, images, n, args
        self.error: list[BaseException] = []

    def run(self) -> None:
        from streamkd.commands.produce import dataset_records, make_producer, produce

        try:
            producer = make_producer(self.bootstrap)
            rng = np.random.default_rng(self.args.seed)
            for _ in range(self.args.passes):
                order = rng.permutation(len(self.images))[: self.n]
                produce(dataset_records(self.images, None, self.args.format, order), self.bootstrap, self.topic,
                        progress=False, producer=producer)
            producer.close()
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            self.error.append(e)


def served_student(parts):
    """The student as the newest snapshot serves it (the EMA weights when ``ema.enabled``), or None."""
    import copy

    from safetensors.torch import load_file

    from streamkd.learn.ema import unwrap

    latest = parts.snapshots.latest()
    if latest is None:
        return None, None
    model = copy.deepcopy(unwrap(parts.learner.student))
    model.load_state_dict(load_file(str(parts.snapshots.file_path(latest["version"], "model.safetensors"))))
    return model.eval(), latest


def _report(parts, test, state: Path, seconds: float, records: int, prog) -> None:
    from streamkd.learn.evaluation import agreement, evaluate

    test_images, test_labels = test
    device = parts.device
    teacher_acc = evaluate(parts.teacher.model, test_images, test_labels, parts.teacher.spec, device=device)["acc"]
    student, latest = served_student(parts)
    if student is None:
        print("\nno snapshot was published (too few images for one training step?)")
        return
    student_acc = evaluate(student, test_images, test_labels, parts.learner.spec, device=device)["acc"]
    test_agree = agreement(student, parts.teacher.model, test_images, parts.learner.spec, parts.teacher.spec,
                           device=device)["agreement"]
    preq = prog.agreement if prog is not None else None
    registry = parts.registry
    rows = [
        ("teacher accuracy (test, 10k)", f"{teacher_acc:.4f}"),
        ("student accuracy (test, 10k)", f"{student_acc:.4f}"),
        ("student / teacher", f"{student_acc / teacher_acc:.3f}"),
        ("agreement on test", f"{test_agree:.4f}"),
        ("prequential agreement (stream)", f"{preq:.4f}" if preq is not None else "-"),
        ("served weights", f"{latest.get('weights', 'student')} (snapshot v{latest['version']})"),
        ("replay buffer", f"{int(registry.get_sample_value('streamkd_replay_buffer_samples') or 0)} samples"),
        ("gate rejections", f"{int(registry.get_sample_value('streamkd_snapshot_gate_rejections_total') or 0)}"),
        ("images", f"{records}"),
        ("images/s", f"{records / seconds:.0f}"),
        ("seconds", f"{seconds:.1f}"),
        ("snapshots", f"{parts.snapshots.directory} (newest v{latest['version']})"),
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
