"""Labelled images for ``streamkd eval``: an ImageFolder-style directory or a labelled Kafka topic.

Both are decoded exactly as the daemon decodes records (:func:`streamkd.ingest.decode.decode_record`, the same
byte and pixel limits) and resized to the teacher's input size and channels, as the batcher does. What
cannot be decoded is skipped and counted, never fatal.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from streamkd.ingest.decode import Decoded, Limits, decode_record
from streamkd.learn.preprocess import resize_uint8

__all__ = ["LabelledSet", "load_image_folder", "load_kafka_topic", "read_classes"]

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".npy")


@dataclass
class LabelledSet:
    """uint8 N×C×H×W `images`, int64 N `labels`, and what was skipped ({reason: count})."""

    images: torch.Tensor
    labels: torch.Tensor
    skipped: Counter = field(default_factory=Counter)


DEFAULT_LIMITS = Limits()  # the daemon's input.* defaults (a frozen dataclass: safe to share)

def read_classes(classes: str | None, classes_file: str | Path | None) -> list[str]:
    """Class names in class-id order, from a comma-separated list or a file with one name per line."""
    if (classes is None) == (classes_file is None):
        raise ValueError("give the class order with --classes a,b,c or --classes-file FILE (one name per line, "
                         "in class-id order: the first line is class 0)")
    if classes is not None:
        names = [c.strip() for c in classes.split(",")]
    else:
        try:
            text = Path(classes_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--classes-file {classes_file}: {e}") from None
        names = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not names or any(not n for n in names):
        raise ValueError("the class list has an empty name")
    dupes = sorted(n for n, k in Counter(names).items() if k > 1)
    if dupes:
        raise ValueError(f"class names repeat: {', '.join(dupes)}")
    return names


def _stack(images: list[torch.Tensor], labels: list[int], skipped: Counter, size: tuple[int, int],
           channels: int) -> LabelledSet:
    if not images:
        return LabelledSet(torch.empty(0, channels, *size, dtype=torch.uint8), torch.empty(0, dtype=torch.int64),
                           skipped)
    return LabelledSet(torch.stack(images), torch.tensor(labels, dtype=torch.int64), skipped)


def _add(decoded: Decoded, label: int, size: tuple[int, int], channels: int, images: list, labels: list) -> None:
    for img in decoded.images:
        images.append(resize_uint8(img, size, channels))
        labels.append(label)


def load_image_folder(root: str | Path, classes: Sequence[str], size: tuple[int, int], channels: int, *,
                      limit: int | None = None, limits: Limits = DEFAULT_LIMITS) -> LabelledSet:
    """Images under ``root/<class name>/`` (JPEG, PNG, WebP, NPY; sorted by path) labelled by the position
    of their folder's name in `classes`. Subfolders not in `classes` are an error (a typo would otherwise
    drop a class silently); classes without a folder contribute no images."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: no such directory")
    present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [n for n in present if n not in classes]
    if unknown:
        raise ValueError(f"{root}: folders {', '.join(unknown)} are not in the class list ({', '.join(classes)})")
    images: list[torch.Tensor] = []
    labels: list[int] = []
    skipped: Counter = Counter()
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            for fname in sorted(filenames):
                if limit is not None and len(images) >= limit:
                    return _stack(images[:limit], labels[:limit], skipped, size, channels)
                path = Path(dirpath) / fname
                if not fname.lower().endswith(IMAGE_SUFFIXES):
                    continue
                if path.stat().st_size > limits.max_bytes:
                    skipped["too_large"] += 1
                    continue
                got = decode_record(path.read_bytes(), None, limits)
                if not isinstance(got, Decoded):
                    skipped[got.reason] += 1
                    log.debug("skipped %s: %s (%s)", path, got.reason, got.detail)
                    continue
                _add(got, label, size, channels, images, labels)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return _stack(images, labels, skipped, size, channels)


def load_kafka_topic(bootstrap_servers: str, topic: str, size: tuple[int, int], channels: int, *,
                     limit: int | None = None, timeout_s: float = 30.0, limits: Limits = DEFAULT_LIMITS,
                     client: dict | None = None) -> LabelledSet:
    """Every record of `topic` from the beginning up to the end offsets seen at start (or `limit` images),
    labelled by its ``label`` header. Records without a label or that do not decode are skipped and counted.
    Reads without a consumer group: nothing is committed. `client` adds kafka-python settings (security)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=[s.strip() for s in bootstrap_servers.split(",") if s.strip()],
                             group_id=None, enable_auto_commit=False, **(client or {}))
    try:
        deadline = time.monotonic() + timeout_s
        parts = consumer.partitions_for_topic(topic)
        while not parts and time.monotonic() < deadline:
            time.sleep(0.2)
            parts = consumer.partitions_for_topic(topic)
        if not parts:
            raise ValueError(f"topic {topic!r} not found on {bootstrap_servers}")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        images: list[torch.Tensor] = []
        labels: list[int] = []
        skipped: Counter = Counter()
        fixed: dict = {}  # partition -> the offset to stop at, once a fetch reported its high watermark
        left = {tp for tp in tps if end[tp] > consumer.position(tp)}
        while left and (limit is None or len(images) < limit):
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic!r} took longer than {timeout_s:g} s "
                                   f"({len(images)} images so far)")
            for tp, records in consumer.poll(timeout_ms=500).items():
                # The end is the larger of the listed end offset and the first fetch's high watermark
                # (some Kafka-compatible brokers list the end of a record batch imprecisely).
                if tp not in fixed and consumer.highwater(tp) is not None:
                    fixed[tp] = max(end[tp], consumer.highwater(tp))
                stop_at = fixed.get(tp, end[tp])
                for rec in records:
                    if rec.offset >= stop_at:
                        continue
                    got = decode_record(rec.value, rec.headers, limits)
                    if not isinstance(got, Decoded):
                        skipped[got.reason] += 1
                    elif got.label is None:
                        skipped["no_label"] += 1
                    else:
                        _add(got, got.label, size, channels, images, labels)
                if tp in fixed and consumer.position(tp) >= fixed[tp]:
                    left.discard(tp)
    finally:
        consumer.close()
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return _stack(images, labels, skipped, size, channels)
