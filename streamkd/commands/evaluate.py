"""`streamkd eval`: a snapshot's accuracy (and the teacher's, and how often they agree) on a labelled set:
Fashion-MNIST, an ImageFolder-style directory (``--folder``, one subfolder per class) or a labelled Kafka
topic (``--topic``, the ``label`` header).

The command runs each model once (:func:`streamkd.learn.evaluation.predict`) and derives all three figures
from the two prediction vectors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from streamkd.learn.evaluation import predict
from streamkd.learn.learner import InputSpec

__all__ = ["register", "spec_from_manifest"]


def spec_from_manifest(student: Mapping[str, Any]) -> InputSpec:
    """InputSpec from a manifest's `student` section (input_size, channels, mean, std)."""
    from streamkd.state.layout import student_geometry

    c, h, w = student_geometry(dict(student))
    return InputSpec((h, w), c, tuple(student["mean"]), tuple(student["std"]))


# ---- command line -------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    from streamkd.config import TeacherConfig
    from streamkd.learn.models import TEACHER_SPEC

    t = TeacherConfig()
    p = subparsers.add_parser("eval", help="accuracy/agreement of a snapshot (and the teacher) on a labelled set",
                              description="Student accuracy, teacher accuracy and their top-1 agreement.")
    p.add_argument("snapshot", metavar="SNAPSHOT", help="a snapshot directory (uses LATEST) or one version folder")
    p.add_argument("--dataset", choices=["fashion-mnist"], default="fashion-mnist",
                   help="the built-in set, used unless --folder or --topic is given (default: %(default)s)")
    p.add_argument("--split", choices=["train", "test"], default="test")
    p.add_argument("--data-dir", default=None,
                   help="where Fashion-MNIST lives (default: $STREAMKD_DATA_DIR, Debian's, a download)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--folder", default=None, metavar="DIR",
                     help="labelled images as DIR/<class name>/*.{jpg,png,webp,npy}; needs the class order")
    src.add_argument("--topic", default=None, metavar="TOPIC",
                     help="a Kafka topic whose records carry a `label` header (read from the start, not committed)")
    order = p.add_mutually_exclusive_group()
    order.add_argument("--classes", default=None, metavar="A,B,...",
                       help="--folder's class names in class-id order (the first is class 0)")
    order.add_argument("--classes-file", default=None, metavar="FILE",
                       help="--folder's class names, one per line, in class-id order")
    p.add_argument("--bootstrap-servers", default=os.environ.get("STREAMKD_KAFKA__BOOTSTRAP_SERVERS", "localhost:9092"),
                   help="for --topic (default: $STREAMKD_KAFKA__BOOTSTRAP_SERVERS or %(default)s)")
    p.add_argument("--timeout", type=float, default=120.0, metavar="S",
                   help="for --topic: give up after S seconds (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N images")
    p.add_argument("--teacher", default=None, metavar="MODEL_SPEC",
                   help=f"teacher to compare with (default: {TEACHER_SPEC} with the shipped weights, when present)")
    p.add_argument("--teacher-weights", default=None, metavar="FILE", help="weights for --teacher")
    p.add_argument("--no-teacher", action="store_true", help="evaluate the student only")
    p.add_argument("--teacher-input-size", type=int, nargs=2, default=list(t.input_size), metavar=("H", "W"),
                   help="default: %(default)s")
    p.add_argument("--teacher-channels", type=int, choices=[1, 3], default=t.channels, help="default: %(default)s")
    p.add_argument("--teacher-mean", type=float, nargs="+", default=list(t.mean), help="default: %(default)s")
    p.add_argument("--teacher-std", type=float, nargs="+", default=list(t.std), help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=512, help="default: %(default)s")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when available) | cpu | cuda[:N] (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=_main)


def _teacher(args: argparse.Namespace) -> tuple[nn.Module | None, str | None, str]:
    """(model, spec, note) for the teacher the arguments ask for; model None = not evaluated (note says why)."""
    from streamkd.learn.models import (
        FILE_SUFFIXES,
        TEACHER_SPEC,
        build_model,
        shipped_teacher_weights,
    )

    if args.no_teacher:
        return None, None, "skipped (--no-teacher)"
    spec, weights = args.teacher or TEACHER_SPEC, args.teacher_weights
    if weights is None and spec == TEACHER_SPEC:
        try:
            weights = str(shipped_teacher_weights())
        except FileNotFoundError as e:
            if args.teacher is None:  # the default is best-effort
                return None, None, f"not evaluated ({e})"
            raise ValueError(str(e)) from None
    if weights is None and not spec.endswith(FILE_SUFFIXES):
        raise ValueError(f"--teacher {spec} needs --teacher-weights "
                         "(random weights would make its figures meaningless)")
    model = build_model(spec, None, in_channels=args.teacher_channels, input_size=tuple(args.teacher_input_size),
                        weights=weights)
    return model, spec, weights or spec


def _main(args: argparse.Namespace) -> int:
    from streamkd.commands.datasets import DatasetNotFound
    from streamkd.learn.learner import resolve_device
    from streamkd.serve.export import load_student
    from streamkd.state.layout import SnapshotError, resolve_version_dir

    def fail(msg: str) -> int:
        print(f"streamkd eval: {msg}", file=sys.stderr)
        return 2

    if args.limit is not None and args.limit < 1:
        return fail(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        return fail(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        device = resolve_device(args.device)
        vdir = resolve_version_dir(args.snapshot)
        student, manifest = load_student(vdir)
        s_spec = spec_from_manifest(manifest["student"])
        teacher, teacher_spec, teacher_note = _teacher(args)
        t_spec = InputSpec(tuple(args.teacher_input_size), args.teacher_channels,
                           tuple(args.teacher_mean), tuple(args.teacher_std))
        images, labels, data = _load_data(args, t_spec if teacher is not None else s_spec,
                                          manifest["student"].get("num_classes"))
    except (SnapshotError, ValueError, RuntimeError, OSError, DatasetNotFound) as e:
        return fail(str(e))
    if args.limit is not None:
        images, labels = images[: args.limit], labels[: args.limit]

    n = int(labels.shape[0])
    if n == 0:
        return fail(f"no labelled images in {data['name']} (skipped: {data.get('skipped') or 'none'})")
    ps = predict(student, images, s_spec, args.batch_size, device)
    result: dict[str, Any] = {
        "snapshot": str(vdir), "version": manifest.get("version"), "step": manifest.get("step"),
        "dataset": data["name"], "split": data.get("split"), "n": n, "skipped": data.get("skipped", {}),
        "classes": data.get("classes"),
        "student": {"model": manifest["student"]["model"], "acc": float((ps == labels).sum()) / n},
        "teacher": None, "agreement": None,
    }
    if teacher is not None:
        pt = predict(teacher, images, t_spec, args.batch_size, device)
        result["teacher"] = {"model": teacher_spec, "weights": teacher_note, "acc": float((pt == labels).sum()) / n}
        result["agreement"] = float((ps == pt).sum()) / n

    if args.json:
        print(json.dumps(result))
        return 0
    rows = [
        ("snapshot", f"{vdir} (version {result['version']}, step {result['step']})"),
        ("dataset", f"{data['name']}{' ' + data['split'] if data.get('split') else ''}, {n:,} images"
                    + (f" ({sum(data['skipped'].values()):,} skipped: {dict(data['skipped'])})"
                       if data.get("skipped") else "")),
        ("student", f"{result['student']['acc']:.4f}  {result['student']['model']}"),
        ("teacher", f"{result['teacher']['acc']:.4f}  {teacher_spec} ({Path(teacher_note).name})"
         if result["teacher"] else teacher_note),
    ]
    if result["agreement"] is not None:
        rows.append(("agreement", f"{result['agreement']:.4f}  student vs teacher, top-1"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def _load_data(args: argparse.Namespace, spec: InputSpec, num_classes: int | None
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(uint8 N×C×H×W images, int64 N labels, a description) for the set the arguments name. Folder and
    Kafka images are decoded like the daemon's records and sized for `spec` (the teacher's input)."""
    from streamkd.commands.datasets import load_fashion_mnist
    from streamkd.commands.eval_data import load_image_folder, load_kafka_topic, read_classes

    if args.folder is None and (args.classes is not None or args.classes_file is not None):
        raise ValueError("--classes/--classes-file go with --folder")
    if args.folder is not None:
        classes = read_classes(args.classes, args.classes_file)
        if num_classes is not None and len(classes) > int(num_classes):
            raise ValueError(f"{len(classes)} class names but the student has {num_classes} classes")
        got = load_image_folder(args.folder, classes, spec.size, spec.channels, limit=args.limit)
        return got.images, got.labels, {"name": f"folder {args.folder}", "classes": classes,
                                        "skipped": dict(got.skipped)}
    if args.topic is not None:
        got = load_kafka_topic(args.bootstrap_servers, args.topic, spec.size, spec.channels, limit=args.limit,
                               timeout_s=args.timeout)
        return got.images, got.labels, {"name": f"kafka {args.topic}", "skipped": dict(got.skipped)}
    images, labels = load_fashion_mnist(args.split, args.data_dir)
    return images, labels, {"name": args.dataset, "split": args.split}
