"""Throughput benchmark: end to end from Kafka vs the compute ceiling vs the loop users write by hand.

In ONE run, on the same device and settings, it measures:

* ``teacher_only_img_s``: the teacher forward alone (as the daemon runs it: folded BN,
  channels_last, ``teacher.precision``), on uint8 batches already on the device;
* ``student_step_img_s``: the student's training step alone (precomputed teacher logits);
* ``compute_only_img_s``: teacher forward + student step (the daemon's ``Teacher`` and
  ``Learner`` objects) on batches already on the device -- the ceiling for (c);
* ``naive_img_s``: the seed's loop as a user writes it: a kafka-python consumer,
  per-record PIL decode, fp32 teacher and student, synchronous (``loss.item()`` every step);
* ``e2e_img_s``: the real daemon loop (``streamkd.daemon.run``) from the broker:
  consumer thread(s) -> decode pool -> prefetch queue -> device.
  ``loop_*_ms`` say where the loop thread spent each batch's time after warm-up (waiting for
  data, in the teacher, in the student step, the rest): the first place to look when e2e falls
  short of compute-only.

Presets: ``cpu`` (default): the shipped Fashion-MNIST teacher -> ``lenet5``, 28 px PNG
records; ``gpu``: ``torchvision:resnet50`` (random weights) at 224 px -> ``torchvision:
mobilenet_v3_small``, JPEG records. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time

import numpy as np
import torch

PRESETS = {
    "cpu": dict(records=30_000, batch=64, fmt="png", warmup=3_000, naive_records=6_000, compute_steps=150,
                overrides=[]),
    "gpu": dict(records=200_000, batch=256, fmt="jpeg", warmup=30_000, naive_records=20_000, compute_steps=200,
                overrides=["teacher.model=torchvision:resnet50", "teacher.input_size=224", "teacher.channels=3",
                           "teacher.mean=[0.485, 0.456, 0.406]", "teacher.std=[0.229, 0.224, 0.225]",
                           "teacher.num_classes=1000", "student.model=torchvision:mobilenet_v3_small",
                           "input.decode_workers=12", "kafka.consumers=4", "train.prefetch_batches=6",
                           "kafka.queue_records=16384"]),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_records(preset: str, n_distinct: int) -> list[tuple[bytes, list]]:
    """Distinct encoded images, cycled by the producer (timing does not depend on pixel content)."""
    from streamkd.commands.produce import encode_image

    if preset == "cpu":
        from streamkd.commands.datasets import load_fashion_mnist

        images, _ = load_fashion_mnist("train")
        return [(encode_image(images[i], "png")[0], [("content-type", b"image/png")]) for i in range(n_distinct)]
    # Smooth synthetic 224 px RGB scenes: JPEG sizes like natural photos (~5-10 KB), not noise (~40 KB).
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:224, 0:224].astype(np.float32) / 224
    out = []
    for _ in range(n_distinct):
        a = rng.uniform(0, 6, size=(3, 4))
        img = np.stack([127 + 60 * np.sin(a[c, 0] * xx + a[c, 1] * yy + a[c, 2]) + 40 * np.cos(a[c, 3] * xx * yy * 6)
                        for c in range(3)])
        img += rng.normal(0, 6, img.shape)
        t = torch.from_numpy(np.clip(img, 0, 255).astype(np.uint8))
        out.append((encode_image(t, "jpeg", quality=85)[0], [("content-type", b"image/jpeg")]))
    return out


def produce_n(bootstrap: str, topic: str, records, n: int) -> float:
    from streamkd.commands.produce import make_producer, produce

    prod = make_producer(bootstrap, compression_type=None)
    t = time.monotonic()
    produce((records[i % len(records)] for i in range(n)), bootstrap, topic, progress=False, producer=prod)
    prod.close()
    return time.monotonic() - t


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_compute(parts, batch: int, steps: int, rounds: int = 3) -> tuple[float, float, float]:
    """(teacher only, student step only, teacher + student step) images/s on device-resident uint8 batches.

    The three are measured in ``rounds`` alternating rounds and the median of each is kept, so a noisy
    neighbour on a shared machine moves all three alike instead of skewing one of them.
    """
    dev = parts.device
    c, (h, w) = parts.cfg.teacher.channels, parts.cfg.teacher.input_size
    x = torch.randint(0, 256, (batch, c, h, w), dtype=torch.uint8, device=dev)
    y = torch.full((batch,), -1, dtype=torch.int64, device=dev)
    for _ in range(5):  # warm-up: cuDNN autotuning, allocator, lazy init
        parts.learner.step(x, parts.teacher(x), y)
    sync(dev)
    logits = parts.teacher(x)
    per_round = max(1, steps // rounds)

    def rate(fn) -> float:
        sync(dev)
        t = time.perf_counter()
        for _ in range(per_round):
            fn()
        sync(dev)
        return batch * per_round / (time.perf_counter() - t)

    runs = [(rate(lambda: parts.teacher(x)), rate(lambda: parts.learner.step(x, logits, y)),
             rate(lambda: parts.learner.step(x, parts.teacher(x), y))) for _ in range(rounds)]
    teacher_only, student_only, compute = (statistics.median(r[i] for r in runs) for i in range(3))
    return teacher_only, student_only, compute


def measure_nvjpeg(records, batch: int, parts, rounds: int = 20) -> dict:
    """nvJPEG batch decode alone, and whether it lets Python run meanwhile (GIL probe), on CUDA only."""
    from streamkd.ingest.decode import Limits
    from streamkd.ingest.gpu_decode import GpuJpegDecoder, check_jpeg

    refs = [check_jpeg(v, h, Limits()) for v, h in records[:batch]]
    dec = GpuJpegDecoder(parts.device, parts.cfg.teacher.input_size, parts.cfg.teacher.channels)
    for _ in range(3):
        dec.decode(refs)[2].synchronize()
    t = time.perf_counter()
    for _ in range(rounds):
        dec.decode(refs)[2].synchronize()
    decode_rate = batch * rounds / (time.perf_counter() - t)

    def spin(seconds: float) -> int:  # pure-Python work: how much of it runs per second
        n, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            n += 1
        return n

    alone = spin(1.0)
    worker = threading.Thread(target=lambda: [dec.decode(refs)[2].synchronize() for _ in range(rounds * 3)])
    worker.start()
    beside = spin(1.0)
    worker.join()
    return {"nvjpeg_decode_img_s": round(decode_rate, 1), "python_share_during_decode": round(beside / alone, 3)}


def measure_naive(cfg, bootstrap: str, topic: str, batch: int, n: int, device: torch.device) -> float:
    """The hand-written loop: poll, PIL-decode each record, fp32 teacher, fp32 student step, .item() each step."""
    from kafka import KafkaConsumer
    from PIL import Image

    from streamkd.learn.loss import kd_loss
    from streamkd.learn.models import TEACHER_SPEC, build_model, shipped_teacher_weights

    t_cfg = cfg.teacher
    weights = t_cfg.weights or (str(shipped_teacher_weights()) if t_cfg.model == TEACHER_SPEC else None)
    teacher = build_model(t_cfg.model, t_cfg.num_classes, in_channels=t_cfg.channels, input_size=t_cfg.input_size,
                          weights=weights).to(device).eval()
    student = build_model(cfg.student.model, t_cfg.num_classes or 10, in_channels=cfg.student_channels,
                          input_size=cfg.student_input_size).to(device).train()
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.train.lr)
    mean = torch.tensor(t_cfg.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(t_cfg.std, device=device).view(1, -1, 1, 1)
    mode = "L" if t_cfg.channels == 1 else "RGB"
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id="naive", auto_offset_reset="earliest",
                             enable_auto_commit=False, session_timeout_ms=6000, heartbeat_interval_ms=1000)
    seen, buf, started, t0 = 0, [], False, 0.0
    while seen < n:
        for records in consumer.poll(timeout_ms=500).values():
            for r in records:
                img = Image.open(io.BytesIO(r.value)).convert(mode).resize(t_cfg.input_size[::-1])
                arr = np.asarray(img, dtype=np.float32) / 255.0
                buf.append(torch.from_numpy(arr if arr.ndim == 3 else arr[..., None]).permute(2, 0, 1))
                if len(buf) == batch:
                    x = ((torch.stack(buf).to(device) - mean) / std)
                    buf = []
                    with torch.no_grad():
                        t_logits = teacher(x)
                    loss = kd_loss(student(x), t_logits, torch.full((batch,), -1, device=device),
                                   cfg.train.temperature, cfg.train.alpha).total
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    loss.item()  # what a hand-written loop logs every step
                    if not started:  # first batch done: start the clock (excludes the group join)
                        started, t0, seen = True, time.perf_counter(), 0
                    else:
                        seen += batch
    consumer.close()
    return seen / (time.perf_counter() - t0)


LOOP_PARTS = {"wait": "streamkd_batch_wait_seconds", "teacher": "streamkd_teacher_inference_seconds",
              "student": "streamkd_train_step_seconds"}


def loop_sums(registry) -> dict[str, float]:
    out = {k: registry.get_sample_value(f"{name}_sum") or 0.0 for k, name in LOOP_PARTS.items()}
    out["batches"] = registry.get_sample_value("streamkd_teacher_inference_seconds_count") or 0.0
    return out


def measure_e2e(parts, n: int, warmup: int) -> tuple[float, object, dict]:
    """Images/s after warm-up, and where the loop thread spent each batch's time (ms, host clock).

    ``wait``: blocked on the prefetch queue (ingest-bound); ``teacher``/``student``: in those calls
    (compute on CPU; kernel launches on CUDA, so high values there mean the loop is CPU-bound);
    ``other``: the rest (on CUDA mostly the lagged stats read, i.e. waiting for the GPU).
    """
    from streamkd import daemon

    marks: dict[str, tuple[float, int, dict]] = {}

    def on_progress(p) -> None:
        if "start" not in marks and p.samples_seen >= warmup:
            marks["start"] = (time.perf_counter(), p.samples_seen, loop_sums(parts.registry))

    def stop_when(p) -> bool:
        if p.records_done >= n:
            marks["end"] = (time.perf_counter(), p.samples_seen, loop_sums(parts.registry))
            return True
        return False

    prog = daemon.run(parts, threading.Event(), on_progress=on_progress, stop_when=stop_when)
    t0, s0, a = marks["start"]
    t1, s1, b = marks["end"]
    batches = max(b["batches"] - a["batches"], 1)
    loop = {f"loop_{k}_ms": round(1000 * (b[k] - a[k]) / batches, 3) for k in LOOP_PARTS}
    loop["loop_batch_ms"] = round(1000 * (t1 - t0) / batches, 3)
    loop["loop_other_ms"] = round(loop["loop_batch_ms"] - sum(loop[f"loop_{k}_ms"] for k in LOOP_PARTS), 3)
    return (s1 - s0) / (t1 - t0), prog, loop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--records", type=int, help="records for the end-to-end run")
    ap.add_argument("--naive-records", type=int, help="records for the hand-written loop (fewer: a quicker run)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--set", action="append", default=[], help="extra config overrides for the daemon")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script itself (numbers meaningless)")
    args = ap.parse_args()
    p = dict(PRESETS[args.preset])
    if args.smoke:
        p.update(records=600, batch=16, warmup=100, naive_records=64, compute_steps=2)
    n = args.records or p["records"]
    if args.naive_records:
        p["naive_records"] = args.naive_records
    p["warmup"] = min(p["warmup"], n // 4)  # the timed stretch must be most of a short run

    from streamkd import daemon
    from streamkd.commands.broker import EmbeddedBroker, ensure_topics
    from streamkd.config import load_config
    from streamkd.logs import setup_logging

    setup_logging("text", "WARNING")
    state = tempfile.mkdtemp(prefix="streamkd-tput-")
    records = make_records(args.preset, 512 if args.preset == "gpu" else 4096)
    avg_kb = sum(len(v) for v, _ in records) / len(records) / 1024
    with EmbeddedBroker() as broker:
        ensure_topics(broker.bootstrap, {"e2e": 8 if args.preset == "gpu" else 3, "naive": 1})
        log(f"producing {n} + {p['naive_records'] + p['batch']} {p['fmt']} records (~{avg_kb:.1f} KB each)")
        produce_s = produce_n(broker.bootstrap, "e2e", records, n)
        produce_n(broker.bootstrap, "naive", records, p["naive_records"] + 2 * p["batch"])
        overrides = [f"kafka.bootstrap_servers={broker.bootstrap}", "kafka.topic=e2e",
                     f"checkpoint.dir={state}/ckpt", f"snapshot.dir={state}/snap", "metrics.port=0",
                     f"train.device={args.device}", f"train.batch_size={p['batch']}", "logging.progress_every_s=10",
                     *p["overrides"], *args.set]
        cfg = load_config(None, overrides, env={})
        parts = daemon.build(cfg)
        dev = parts.device
        log(f"device {dev}; measuring compute-only")
        teacher_only, student_only, compute_only = measure_compute(parts, p["batch"], p["compute_steps"])
        log(f"teacher-only {teacher_only:.0f} img/s, student-step-only {student_only:.0f} img/s, "
            f"compute-only {compute_only:.0f} img/s; measuring naive loop")
        nvjpeg = measure_nvjpeg(records, p["batch"], parts) if dev.type == "cuda" and p["fmt"] == "jpeg" else {}
        if nvjpeg:
            log(f"nvJPEG {nvjpeg}")
        naive = measure_naive(cfg, broker.bootstrap, "naive", p["batch"], p["naive_records"], dev)
        log(f"naive {naive:.0f} img/s; measuring end to end ({n} records)")
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        parts = daemon.build(cfg)  # fresh student and optimizer for the e2e run
        e2e, prog, loop = measure_e2e(parts, n, p["warmup"])
    result = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "e2e_img_s": round(e2e, 1),
        "compute_only_img_s": round(compute_only, 1),
        "teacher_only_img_s": round(teacher_only, 1),
        "student_step_img_s": round(student_only, 1),
        "naive_img_s": round(naive, 1),
        "ratio_vs_compute": round(e2e / compute_only, 3),
        "ratio_vs_teacher_only": round(e2e / teacher_only, 3),
        "speedup_vs_naive": round(e2e / naive, 2),
        "rss_mb": round(rss_mb(), 1),
        "records": n,
        "trained": prog.samples_seen,
        "record_kb": round(avg_kb, 2),
        "batch_size": p["batch"],
        "produce_records_per_s": round(n / produce_s, 1),
        "teacher_precision": parts.teacher_info["precision"],
        "torch": torch.__version__,
    }
    result.update(loop)
    result.update(nvjpeg)
    if dev.type == "cuda":
        result["gpu_mem_gb"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
