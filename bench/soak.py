"""Soak: 500,000 records through the CPU preset; is memory flat?

A producer thread streams Fashion-MNIST PNG records (cycled) into an embedded
broker while the real daemon loop trains on them, checkpointing and
publishing snapshots as configured. RSS of this process (which holds the
daemon, the producer and the client buffers; the broker is a separate process)
is sampled after warm-up and at the end. On CUDA, allocated GPU memory too.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time

import torch


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=500_000)
    ap.add_argument("--warmup", type=int, default=50_000)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    from streamkd import daemon
    from streamkd.commands.broker import EmbeddedBroker, ensure_topics
    from streamkd.commands.datasets import load_fashion_mnist
    from streamkd.commands.produce import encode_image, make_producer, produce
    from streamkd.config import load_config
    from streamkd.logs import setup_logging

    setup_logging("text", "WARNING")
    images, _ = load_fashion_mnist("train")
    values = [(encode_image(images[i])[0], [("content-type", b"image/png")]) for i in range(10_000)]
    state = tempfile.mkdtemp(prefix="streamkd-soak-")
    samples: list[dict] = []
    with EmbeddedBroker() as broker:
        ensure_topics(broker.bootstrap, {"soak": 3})

        def stream() -> None:
            prod = make_producer(broker.bootstrap)
            produce((values[i % len(values)] for i in range(args.records)), broker.bootstrap, "soak",
                    progress=False, producer=prod)
            prod.close()

        threading.Thread(target=stream, daemon=True).start()
        cfg = load_config(None, [f"kafka.bootstrap_servers={broker.bootstrap}", "kafka.topic=soak",
                                 f"checkpoint.dir={state}/ckpt", f"snapshot.dir={state}/snap", "metrics.port=0",
                                 f"train.device={args.device}", "train.batch_size=64",
                                 "checkpoint.every_steps=500", "snapshot.every_steps=2000",
                                 "logging.progress_every_s=60"], env={})
        parts = daemon.build(cfg)
        cuda = parts.device.type == "cuda"
        t0 = time.monotonic()
        next_mark = [args.warmup]

        def on_progress(p) -> None:
            if p.records_done >= next_mark[0]:
                next_mark[0] += 50_000
                row = {"records": p.records_done, "rss_mb": round(rss_mb(), 1),
                       "seconds": round(time.monotonic() - t0, 1)}
                if cuda:
                    row["gpu_mem_mb"] = round(torch.cuda.memory_allocated(parts.device) / 2**20, 1)
                samples.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)

        prog = daemon.run(parts, threading.Event(), on_progress=on_progress,
                          stop_when=lambda p: p.records_done >= args.records)
    first, last = samples[0], samples[-1]
    result = {"records": prog.records_done, "trained": prog.samples_seen,
              "rss_after_warmup_mb": first["rss_mb"], "rss_end_mb": last["rss_mb"],
              "rss_growth_ratio": round(last["rss_mb"] / first["rss_mb"] - 1, 4),
              "rss_max_mb": max(s["rss_mb"] for s in samples), "seconds": last["seconds"],
              "images_per_s": round(prog.samples_seen / last["seconds"], 1), "device": str(parts.device)}
    if cuda:
        result["gpu_mem_after_warmup_mb"] = first["gpu_mem_mb"]
        result["gpu_mem_end_mb"] = last["gpu_mem_mb"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
