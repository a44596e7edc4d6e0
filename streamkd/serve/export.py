"""`streamkd export`: a snapshot's student to ONNX, TorchScript or a torch.export program.

Every artifact is written under a temporary folder beside its target, reloaded
and run against the PyTorch model on a random input (batch 1 and 3, so the
dynamic batch axis is exercised too), and only then moved to its final name.
A file at the final name has therefore been verified.

Served models take ``input`` float32 N×C×H×W, normalized as the manifest's
``student.preprocess`` says, and return ``logits`` float32 N×num_classes.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import os
import sys
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from streamkd.learn.models import build_model, load_state_dict_file
from streamkd.state.fsutil import fsync_dir, fsync_tree, remove_tree
from streamkd.state.layout import (
    MANIFEST_FILE,
    MODEL_FILE,
    SnapshotError,
    check_manifest_model_spec,
    read_manifest,
    resolve_version_dir,
    student_geometry,
)

__all__ = [
    "FORMATS",
    "INPUT_NAME",
    "ONNX_OPSET",
    "OUTPUT_NAME",
    "build_student",
    "export_model",
    "load_student",
    "register",
    "snapshot_exporters",
    "snapshot_extras",
]

# format -> file name inside a snapshot version folder
# (model.pt for TorchScript: the name Triton's libtorch backend loads.)
FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt", "pt2": "model.pt2"}
INPUT_NAME, OUTPUT_NAME = "input", "logits"
ONNX_OPSET = 18
# ONNX protobufs cap at 2 GiB; above this the weights go to a companion `<name>.data` file.
_ONNX_INLINE_LIMIT = 1 << 30
_VERIFY_BATCHES = (1, 3)  # 3 differs from the tracing batch (2): proves the batch axis is symbolic
log = logging.getLogger(__name__)


# ---- reading snapshots ---------------------------------------------------------


def load_student(snapshot_dir: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild a snapshot's student (eval mode, CPU) after checking every file's sha256.

    `snapshot_dir` is a version folder or a snapshot root (then LATEST's version).
    Returns (model, manifest); raises SnapshotError on any mismatch.
    """
    vdir = resolve_version_dir(snapshot_dir)
    manifest = read_manifest(vdir, verify=True)
    return build_student(manifest["student"], vdir / MODEL_FILE, where=str(vdir / MANIFEST_FILE)), manifest


def build_student(student: dict, weights: str | Path, where: str = "manifest") -> nn.Module:
    """The model a manifest's `student` section describes, with `weights` loaded (eval mode, CPU).

    Only built-in model names are accepted (:func:`check_manifest_model_spec`): never a model file."""
    check_manifest_model_spec(student.get("model"), where)
    c, h, w = student_geometry(student)
    model = build_model(student["model"], student.get("num_classes"), in_channels=c, input_size=(h, w))
    try:
        model.load_state_dict(load_state_dict_file(weights), strict=True)
    except RuntimeError as e:  # missing/unexpected keys, shape mismatches
        raise SnapshotError(f"{weights} does not fit {student['model']!r}: {e}") from None
    return model.eval()


# ---- exporting -----------------------------------------------------------------


def _param_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> str:
    """Write ONNX (opset ONNX_OPSET, dynamic batch); returns the exporter used."""
    external = _param_bytes(model) > _ONNX_INLINE_LIMIT
    for name in ("onnxscript", "onnx_ir"):
        # Their optimizer logs every pass at INFO: a dozen lines per snapshot in the daemon's log.
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        # The torch.export-based exporter: the default since torch 2.9, the old one is deprecated.
        # verbose=False keeps its progress lines off stdout (the daemon exports on a background thread).
        torch.onnx.export(
            model, (example,), str(path), dynamo=True, external_data=external, opset_version=ONNX_OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), verbose=False,
        )
        return "dynamo"
    except Exception as e:  # noqa: BLE001 - e.g. onnxscript missing, an op it cannot translate
        log.warning("torch.export-based ONNX export failed (%s: %s); retrying with the TorchScript-based exporter",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        for p in path.parent.iterdir():
            p.unlink()
    torch.onnx.export(
        model, (example,), str(path), dynamo=False, opset_version=ONNX_OPSET,
        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, verbose=False,
    )
    return "torchscript"


def _export_pt2(model: nn.Module, example: torch.Tensor, path: Path, fixed_batch: int) -> bool:
    """Write a torch.export program; returns whether its batch axis is dynamic."""
    try:
        program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        dynamic = True
    except Exception as e:  # noqa: BLE001 - a model that specializes on its batch size
        log.warning("torch.export with a dynamic batch failed (%s); exporting a fixed batch of %d",
                    str(e).splitlines()[0] if str(e) else type(e).__name__, fixed_batch)
        fixed = torch.zeros(fixed_batch, *example.shape[1:])
        program, dynamic = torch.export.export(model, (fixed,)), False
    torch.export.save(program, str(path))
    return dynamic


def _reload(fmt: str, path: Path) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A function running the artifact at `path` on the CPU: float N×C×H×W -> logits
    (None for ONNX when onnxruntime is not installed)."""
    if fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            return None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1  # a few tiny batches; do not contend with training for every core
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(sess.run([OUTPUT_NAME], {INPUT_NAME: x.cpu().numpy()})[0])
    m = torch.jit.load(str(path), map_location="cpu") if fmt == "torchscript" else torch.export.load(str(path)).module()
    return lambda x: m(x).detach()


def export_model(
    model: nn.Module,
    input_shape: tuple[int, int, int, int],
    fmt: str,
    out: str | Path,
    *,
    atol: float = 1e-4,
) -> dict[str, Any]:
    """Export `model` (input float32 `input_shape` N×C×H×W, batch axis dynamic) to `out`, verified.

    A model on a GPU is exported from a CPU copy (the artifact is device-agnostic).

    fmt: "onnx" | "torchscript" | "pt2". The artifact is reloaded and run on
    random inputs of batch 1 and 3 (1 and N for a fixed-batch fallback);
    max |exported - pytorch| must stay below `atol` × max(1, max |logit|),
    else RuntimeError and `out` is left untouched. Written atomically (temp
    folder, fsync, os.replace). Returns {"format", "path", "bytes",
    "max_abs_diff", "dynamic_batch", "exporter"}.
    """
    if fmt not in FORMATS:
        raise ValueError(f"Invalid format {fmt!r}. Only {', '.join(FORMATS)} are supported.")
    if len(input_shape) != 4:
        raise ValueError(f"input_shape must be (N, C, H, W), got {tuple(input_shape)}")
    out = Path(out)
    _, c, h, w = (int(v) for v in input_shape)
    ref = next(iter([*model.parameters(), *model.buffers()]), None)
    if ref is not None and ref.device.type != "cpu":
        # Export from the CPU: portable artifacts (no device baked into the graph), and a
        # reference free of TF32/cuDNN differences that would fail the 1e-4 comparison.
        model = copy.deepcopy(model).cpu()
    # Trace with batch 2: an example batch of 1 lets tracers specialize the batch axis to 1.
    example = torch.zeros(2, c, h, w)
    was_training = model.training
    model.eval()
    tmp = out.parent / f".tmp-{out.name}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=False)
    try:
        target = tmp / out.name
        dynamic = True
        if fmt == "onnx":
            used = _export_onnx(model, example, target)
            exporter = "torch.onnx (dynamo)" if used == "dynamo" else "torch.onnx (torchscript)"
        elif fmt == "torchscript":
            exporter = "torch.jit.trace"
            torch.jit.save(torch.jit.trace(model, example), str(target))
        else:
            exporter = "torch.export"
            dynamic = _export_pt2(model, example, target, int(input_shape[0]))
        with torch.no_grad():
            diff = _verify(fmt, target, model, _VERIFY_BATCHES if dynamic else (int(input_shape[0]),), (c, h, w), atol)
        fsync_tree(tmp)
        # Companions (ONNX external data) first, so the main file never names a missing one.
        for p in sorted(tmp.iterdir(), key=lambda p: p.name == out.name):
            os.replace(p, out.parent / p.name)
        fsync_dir(out.parent)
    finally:
        remove_tree(tmp)
        model.train(was_training)
    return {"format": fmt, "path": str(out), "bytes": out.stat().st_size, "max_abs_diff": diff,
            "dynamic_batch": dynamic, "exporter": exporter}


def _verify(fmt: str, path: Path, model: nn.Module, batches: Iterable[int], chw: tuple[int, int, int],
            atol: float) -> float | None:
    """Max abs difference between the reloaded artifact and `model` over random inputs; raises above tolerance."""
    run = _reload(fmt, path)
    if run is None:
        import onnx

        onnx.checker.check_model(str(path))  # structure only
        log.warning("onnxruntime is not installed: %s checked structurally, not numerically", path.name)
        return None
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for n in batches:
        x = torch.randn(n, *chw, generator=gen)
        want = model(x).detach().float()
        got = run(x).float()
        if got.shape != want.shape:
            raise RuntimeError(f"exported {fmt} returns {tuple(got.shape)} for batch {n}, PyTorch {tuple(want.shape)}")
        diff = float((got - want).abs().max())
        # Absolute for logits of order 1, relative for larger ones (float32 summation order differs).
        if not diff < atol * max(1.0, float(want.abs().max())):
            raise RuntimeError(f"exported {fmt} disagrees with PyTorch: max abs diff {diff:.3g} at batch {n}")
        worst = max(worst, diff)
    return worst


# ---- the daemon's hook ---------------------------------------------------------


def snapshot_exporters(
    model: nn.Module, input_shape: tuple[int, int, int, int], formats: Iterable[str]
) -> dict[str, Callable[[Path], None]]:
    """{file name: writer(path)} for SnapshotStore.publish(extra_files=...), exporting in this process.

    formats: values of `snapshot.formats` ("onnx" | "torchscript" | "pt2") ->
    model.onnx / model.pt / model.pt2. For tools and tests only: torch.export and
    dynamo keep process-global state, so an export must never run beside a
    training step in the same process; the daemon uses :func:`snapshot_extras`.
    """
    writers: dict[str, Callable[[Path], None]] = {}
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"Invalid snapshot format {fmt!r}. Only {', '.join(FORMATS)} are supported.")
        writers[FORMATS[fmt]] = functools.partial(_write_quietly, model, tuple(input_shape), fmt)
    return writers


def _write_quietly(model: nn.Module, input_shape: tuple[int, int, int, int], fmt: str, path: Path) -> None:
    report = export_model(model, input_shape, fmt, Path(path))
    log.debug("exported %s (%d bytes, max abs diff %s)", Path(path).name, report["bytes"], report["max_abs_diff"])


class SnapshotExports:
    """Writes the configured exports, and Triton's ``config.pbtxt``, into a version folder under construction.

    Called by ``SnapshotStore.publish(write_extras=...)`` once ``model.safetensors``
    is in the folder. The exports run in a child process (``python -m
    streamkd.serve.export --worker``) that rebuilds the student from that file and the
    manifest's ``student`` section, so torch.export/dynamo never run in the
    training process. The child runs at a lower CPU priority with `threads`
    threads. A format that fails or runs past `timeout_s` is logged and left
    out; the snapshot is published without it (this call never raises for an
    export failure). ``config.pbtxt`` is written for the first of `formats`
    that Triton can serve (onnx, torchscript) whose export succeeded.
    """

    def __init__(self, student: dict, formats: Iterable[str], *, timeout_s: float = 600.0, threads: int = 1,
                 triton_max_batch_size: int = 64, triton_max_queue_delay_us: int = 100) -> None:
        self.formats = list(dict.fromkeys(formats))
        for fmt in self.formats:
            if fmt not in FORMATS:
                raise ValueError(f"Invalid snapshot format {fmt!r}. Only {', '.join(FORMATS)} are supported.")
        self.student = dict(student)
        self.timeout_s, self.threads = float(timeout_s), int(threads)
        self.triton = {"max_batch_size": int(triton_max_batch_size),
                       "max_queue_delay_us": int(triton_max_queue_delay_us)}

    def __call__(self, version_dir: Path) -> None:
        vdir = Path(version_dir)
        reports = self._run_worker(vdir) if self.formats else {}
        done = {fmt for fmt, r in reports.items() if r.get("ok") and (vdir / FORMATS[fmt]).is_file()}
        for fmt in self.formats:
            if fmt not in done:
                why = reports.get(fmt, {}).get("error") or "no result from the export process"
                log.error("export %s failed (%s); publishing the snapshot without it", FORMATS[fmt], why)
        # Leave only finished artifacts: a killed child may leave its temporary folder or a failed format's file.
        for p in list(vdir.iterdir()):
            if p.name.startswith(".tmp-"):
                remove_tree(p)
            elif any(p.name == FORMATS[f] or p.name.startswith(FORMATS[f] + ".") for f in self.formats
                     if f not in done):  # the file and its companions (model.onnx.data)
                p.unlink(missing_ok=True)
        from streamkd.serve.triton import CONFIG_FILE, servable_format, write_model_config

        fmt = servable_format(self.formats, [FORMATS[f] for f in done])
        if fmt is not None:
            write_model_config(vdir / CONFIG_FILE, fmt, self.student, max_batch_size=self.triton["max_batch_size"],
                               dynamic_batch=bool(reports[fmt].get("dynamic_batch", True)),
                               max_queue_delay_us=self.triton["max_queue_delay_us"])

    def _run_worker(self, vdir: Path) -> dict[str, dict]:
        """{format: report} from the child; formats it did not report are missing."""
        import subprocess

        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parent.parent)  # the child imports this same streamkd
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        env["OMP_NUM_THREADS"] = str(self.threads)
        cmd = [sys.executable, "-m", "streamkd.serve.export", "--worker", str(vdir),
               "--formats", ",".join(self.formats), "--threads", str(self.threads)]
        try:
            done = subprocess.run(cmd, input=json.dumps(self.student), capture_output=True, text=True, env=env,
                                  timeout=self.timeout_s, start_new_session=True, check=False)
        except subprocess.TimeoutExpired:
            log.error("the export process ran past snapshot.export_timeout_s=%g s and was killed", self.timeout_s)
            return {}
        except OSError as e:
            log.error("could not start the export process: %s", e)
            return {}
        reports: dict[str, dict] = {}
        for line in done.stdout.splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if isinstance(r, dict) and r.get("format") in self.formats:
                reports[r["format"]] = r
        if done.returncode != 0:
            tail = " | ".join(done.stderr.strip().splitlines()[-3:])[-500:]
            log.error("the export process exited with %d: %s", done.returncode, tail or "(no output)")
        return reports


def snapshot_extras(student: dict, snapshot_cfg: Any) -> SnapshotExports | None:
    """The ``write_extras`` hook for SnapshotStore.publish from the `snapshot` config section
    (`formats`, `export_timeout_s`, `export_threads`, `triton_max_batch_size`, `triton_max_queue_delay_us`);
    None when no format is configured."""
    if not snapshot_cfg.formats:
        return None
    return SnapshotExports(student, snapshot_cfg.formats, timeout_s=snapshot_cfg.export_timeout_s,
                           threads=snapshot_cfg.export_threads,
                           triton_max_batch_size=snapshot_cfg.triton_max_batch_size,
                           triton_max_queue_delay_us=snapshot_cfg.triton_max_queue_delay_us)


_MAX_STUDENT_JSON = 1 << 20


def _worker(argv: list[str]) -> int:
    """``python -m streamkd.serve.export --worker DIR --formats onnx,torchscript``: export DIR/model.safetensors
    (the student described by the JSON on stdin) to each format in DIR; one JSON report per line on stdout."""
    p = argparse.ArgumentParser(prog="python -m streamkd.serve.export")
    p.add_argument("--worker", type=Path, required=True, metavar="DIR")
    p.add_argument("--formats", required=True)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        os.nice(10)  # training first
    except OSError:
        pass
    torch.set_num_threads(max(1, args.threads))
    student = json.loads(sys.stdin.read(_MAX_STUDENT_JSON))
    c, h, w = student_geometry(student)
    model = build_student(student, args.worker / MODEL_FILE)
    for fmt in args.formats.split(","):
        try:
            if fmt not in FORMATS:
                raise ValueError(f"Invalid format {fmt!r}. Only {', '.join(FORMATS)} are supported.")
            r = export_model(model, (1, c, h, w), fmt, args.worker / FORMATS[fmt])
            report = {"format": fmt, "ok": True, "pid": os.getpid(), **{k: r[k] for k in (
                "bytes", "max_abs_diff", "dynamic_batch", "exporter")}}
        except Exception as e:  # noqa: BLE001 - one format failing must not cost the others
            first = str(e).splitlines()[0][:300] if str(e) else ""
            report = {"format": fmt, "ok": False, "pid": os.getpid(), "error": f"{type(e).__name__}: {first}"}
        print(json.dumps(report), flush=True)
    return 0


# ---- command line ----------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="a snapshot to ONNX / TorchScript / torch.export for serving",
                              description="Export a snapshot's student; the file is verified against PyTorch "
                                          "before it appears at --out.")
    p.add_argument("snapshot", metavar="SNAPSHOT_DIR", help="a snapshot directory (uses LATEST) or one version folder")
    p.add_argument("--format", choices=list(FORMATS), default="onnx", help="default: %(default)s")
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help="where to write the exported model")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    out: Path = args.out
    if out.is_dir():
        print(f"streamkd export: --out {out} is a directory; name a file", file=sys.stderr)
        return 2
    if not out.parent.is_dir():
        print(f"streamkd export: --out {out}: directory {out.parent} does not exist", file=sys.stderr)
        return 2
    try:
        model, manifest = load_student(args.snapshot)
    except (SnapshotError, ValueError, FileNotFoundError) as e:
        print(f"streamkd export: {e}", file=sys.stderr)
        return 2
    c, h, w = student_geometry(manifest["student"])
    report = export_model(model, (1, c, h, w), args.format, out)
    diff = report["max_abs_diff"]
    s = manifest["student"]
    print(f"wrote {out} ({args.format}, {report['bytes']:,} bytes) from snapshot {manifest.get('version')} "
          f"({s['model']}, input {INPUT_NAME!r} float32 {'N' if report['dynamic_batch'] else 1}×{c}×{h}×{w}, "
          f"output {OUTPUT_NAME!r}); max abs diff vs PyTorch "
          + (f"{diff:.2g}" if diff is not None else "not measured (onnxruntime missing)"))
    print(f"preprocess: x = (uint8 / 255 - {s.get('mean')}) / {s.get('std')}")
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
