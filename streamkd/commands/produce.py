"""``streamkd produce``: publish a dataset or a folder of images into a topic (the wire format's producer side)."""

from __future__ import annotations

import argparse
import io
import itertools
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
                  ".npy": "application/x-npy"}


def encode_image(image: torch.Tensor, fmt: str = "png", quality: int = 90) -> tuple[bytes, str]:
    """uint8 C×H×W (C in 1, 3) -> (encoded bytes, content type). ``fmt``: png | jpeg | webp | npy."""
    arr = image.permute(1, 2, 0).contiguous().numpy()
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, arr[..., 0] if arr.shape[2] == 1 else arr, allow_pickle=False)
        return buf.getvalue(), "application/x-npy"
    from PIL import Image

    pil = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
    buf = io.BytesIO()
    if fmt == "png":
        pil.save(buf, format="PNG", compress_level=1)
    elif fmt == "jpeg":
        pil.save(buf, format="JPEG", quality=quality)
    elif fmt == "webp":
        pil.save(buf, format="WEBP", lossless=True)
    else:
        raise ValueError(f"Invalid format {fmt!r}. Valid: png, jpeg, webp, npy")
    return buf.getvalue(), {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}[fmt]


def dataset_records(images: torch.Tensor, labels: torch.Tensor | None, fmt: str,
                    order: np.ndarray) -> Iterator[tuple[bytes, list[tuple[str, bytes]]]]:
    """(value, headers) per image in ``order``; a ``label`` header when labels are given."""
    for i in order:
        value, ctype = encode_image(images[int(i)], fmt)
        headers = [("content-type", ctype.encode())]
        if labels is not None:
            headers.append(("label", str(int(labels[int(i)])).encode()))
        yield value, headers


def folder_records(folder: Path) -> Iterator[tuple[bytes, list[tuple[str, bytes]]]]:
    """Every image file under ``folder`` (sorted); a numeric parent folder name is taken as the label."""
    for path in sorted(folder.rglob("*")):
        ctype = IMAGE_SUFFIXES.get(path.suffix.lower())
        if ctype is None or not path.is_file():
            continue
        headers = [("content-type", ctype.encode())]
        if path.parent != folder and path.parent.name.isdigit():
            headers.append(("label", path.parent.name.encode()))
        yield path.read_bytes(), headers


COMPRESSIONS = ("none", "gzip", "snappy", "lz4", "zstd")


def make_producer(bootstrap: str, compression: str = "none", **extra):
    """A KafkaProducer for the wire format; ``compression``: one of COMPRESSIONS (record batches, as Kafka's
    ``compression.type``)."""
    from kafka import KafkaProducer

    if compression not in COMPRESSIONS:
        raise ValueError(f"Invalid compression {compression!r}. Valid: {', '.join(COMPRESSIONS)}")
    settings = dict(bootstrap_servers=bootstrap, acks="all", linger_ms=10, batch_size=256 * 1024,
                    max_request_size=16 << 20, retries=10,
                    compression_type=None if compression == "none" else compression)
    return KafkaProducer(**{**settings, **extra})


def produce(records, bootstrap: str, topic: str, *, rate: float | None = None, total: int | None = None,
            progress: bool = True, producer=None) -> int:
    """Send every (value, headers) to ``topic``; returns how many were acknowledged."""
    from tqdm import tqdm

    own = producer is None
    producer = producer or make_producer(bootstrap)
    sent = 0
    start = time.monotonic()
    futures = []
    with tqdm(total=total, unit="img", disable=not progress, desc=f"produce -> {topic}") as bar:
        for value, headers in records:
            if rate:
                ahead = sent / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
            futures.append(producer.send(topic, value=value, headers=headers))
            sent += 1
            bar.update(1)
            if len(futures) >= 10_000:
                for f in futures:
                    f.get(timeout=60)
                futures.clear()
        producer.flush()
        for f in futures:
            f.get(timeout=60)  # raise if any send failed: a silent gap would be worse
    if own:
        producer.close()
    return sent


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("produce", help="publish a dataset or a folder of images into a topic")
    p.add_argument("--bootstrap-servers", default="127.0.0.1:9092")
    p.add_argument("--topic", default="images")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--dataset", choices=["fashion-mnist"], default="fashion-mnist")
    src.add_argument("--folder", type=Path, help="a folder of images (label = numeric parent folder name)")
    p.add_argument("--split", choices=["train", "test"], default="train")
    p.add_argument("--labels", action="store_true", help="add the ground-truth `label` header")
    p.add_argument("--format", choices=["png", "jpeg", "webp", "npy"], default="png")
    p.add_argument("--compression", choices=COMPRESSIONS, default="none",
                   help="Kafka record-batch compression (the consumer reads every one of them)")
    p.add_argument("--limit", type=int, help="at most N images")
    p.add_argument("--rate", type=float, help="images per second (default: as fast as possible)")
    p.add_argument("--loop", action="store_true", help="repeat forever (a continuous demo stream)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed for the dataset order (-1: file order)")
    p.add_argument("--partitions", type=int, default=3, help="partitions when the topic must be created")
    p.add_argument("--data-dir", help="where Fashion-MNIST lives (default: Debian's, then a download cache)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from streamkd.commands.broker import ensure_topics

    ensure_topics(args.bootstrap_servers, {args.topic: args.partitions})
    producer = make_producer(args.bootstrap_servers, args.compression)
    total = 0
    try:
        for _ in itertools.count() if args.loop else range(1):
            if args.folder:
                records = folder_records(args.folder)
                if args.limit:
                    records = itertools.islice(records, args.limit)
                n = None
            else:
                from streamkd.commands.datasets import load_fashion_mnist

                images, labels = load_fashion_mnist(args.split, args.data_dir)
                order = np.arange(len(images)) if args.seed < 0 else np.random.default_rng(args.seed).permutation(
                    len(images))
                order = order[: args.limit] if args.limit else order
                records = dataset_records(images, labels if args.labels else None, args.format, order)
                n = len(order)
            total += produce(records, args.bootstrap_servers, args.topic, rate=args.rate, total=n,
                             progress=not args.quiet, producer=producer)
    except KeyboardInterrupt:
        pass
    finally:
        producer.close()
    print(f"produced {total} records to {args.topic} at {args.bootstrap_servers}")
    return 0
