"""Ingest ceiling: how many records/s the consumer threads + decode stage deliver, with no model at all.

The daemon's e2e figure can never beat this. ``--mode cpu`` decodes every JPEG on the CPU pool;
``--mode check`` runs only what the CPU does on the nvJPEG path (limits + frame-header check),
with a stand-in for the GPU decoder that returns the right shape without decoding, so it measures
the Python side of the GPU pipeline on any machine. Reference in the same run: a bare
kafka-python consumer loop that only counts records (the client's own ceiling).
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time

import torch


class _ShapeOnlyDecoder:
    """Stands in for GpuJpegDecoder on a CPU host: right output shape, no pixels decoded."""

    def __init__(self, size, channels):
        self.size, self.channels = size, channels

    def decode(self, refs, cpu_images=None):
        n = len(refs) + (0 if cpu_images is None else cpu_images.shape[0])
        return torch.empty((n, self.channels, *self.size), dtype=torch.uint8), [], None


def bare_consumer(bootstrap: str, topic: str, n: int) -> float:
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    c.assign([TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic))])
    c.seek_to_beginning()
    seen, t0 = 0, time.perf_counter()
    while seen < n:
        for recs in c.poll(timeout_ms=200).values():
            seen += len(recs)
    c.close()
    return seen / (time.perf_counter() - t0)


def pipeline(bootstrap: str, topic: str, n: int, mode: str, consumers: int, workers: int, batch: int) -> float:
    from streamkd.config import load_config
    from streamkd.ingest.batcher import Batcher
    from streamkd.ingest.decode import Limits
    from streamkd.ingest.source import KafkaSource, RecordQueue

    cfg = load_config(None, [f"kafka.bootstrap_servers={bootstrap}", f"kafka.topic={topic}",
                             f"kafka.consumers={consumers}"], env={})
    stop = threading.Event()
    records = RecordQueue(16384, 256 << 20)
    batches: queue.Queue = queue.Queue(maxsize=8)
    source = KafkaSource(cfg.kafka, records, {}, stop)
    gpu = _ShapeOnlyDecoder((224, 224), 3) if mode == "check" else None
    batcher = Batcher(records, batches, batch_size=batch, max_wait_s=0.2, limits=Limits(), size=(224, 224),
                      channels=3, workers=workers, stop=stop, on_reject=lambda r, why: None, gpu=gpu)
    source.start()
    batcher.start()
    done, t0 = 0, None
    while done < n:
        b = batches.get(timeout=60)
        if t0 is None:
            t0, done = time.perf_counter(), 0  # clock starts at the first batch (excludes connect)
        else:
            done += b.records
    rate = done / (time.perf_counter() - t0)
    stop.set()
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=60_000)
    ap.add_argument("--mode", choices=["check", "cpu"], default="check")
    ap.add_argument("--consumers", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()

    sys.path.insert(0, "bench")
    from throughput import make_records, produce_n

    from streamkd.commands.broker import EmbeddedBroker, ensure_topics
    from streamkd.logs import setup_logging

    setup_logging("text", "WARNING")
    recs = make_records("gpu", 256)
    with EmbeddedBroker() as broker:
        ensure_topics(broker.bootstrap, {"ingest": 4})
        produce_n(broker.bootstrap, "ingest", recs, args.records)
        bare = bare_consumer(broker.bootstrap, "ingest", args.records)
        rate = pipeline(broker.bootstrap, "ingest", args.records - 2 * args.batch, args.mode, args.consumers,
                        args.workers, args.batch)
    print(json.dumps({"mode": args.mode, "records": args.records, "pipeline_records_per_s": round(rate, 1),
                      "bare_consumer_records_per_s": round(bare, 1), "ratio_vs_bare": round(rate / bare, 3),
                      "consumers": args.consumers, "workers": args.workers, "batch": args.batch}))


if __name__ == "__main__":
    main()
