"""Many snapshot exports while the student trains, on the CPU: training must never be disturbed.

torch.export/dynamo keep process-global state: while an export runs, ``torch.compiler.is_exporting()``
is true for every thread, so the optimizer's dynamo-disabled methods (``zero_grad``, ``step``) edit the
global FX annotation dict at the same time as the exporter, and training crashed with ``KeyError:
'custom'`` from ``torch/fx/traceback.py``. Here the loop publishes a snapshot with ONNX and TorchScript
exports every few steps, as the daemon does (weights copied on the loop thread, published on a writer
thread), with small batches so that many optimizer steps fall inside each export, and checks at every
step that the training process never enters export mode.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import pytest
import torch

from streamkd.config import TrainConfig
from streamkd.learn.learner import InputSpec, Learner
from streamkd.learn.models import FMNIST_MEAN, FMNIST_STD, build_model
from streamkd.serve.export import SnapshotExports
from streamkd.state.snapshot import SnapshotStore

STUDENT = {"model": "streamkd:lenet5", "num_classes": 10, "input_shape": [1, 1, 28, 28], "channels": 1,
           "input_size": [28, 28], "mean": list(FMNIST_MEAN), "std": list(FMNIST_STD)}


@pytest.mark.slow
def test_many_exports_beside_training(tmp_path) -> None:
    torch.manual_seed(0)
    teacher = build_model("streamkd:lenet5", 10, in_channels=1, input_size=(28, 28)).eval()
    student = build_model("streamkd:lenet5", 10, in_channels=1, input_size=(28, 28))
    learner = Learner(student, InputSpec((28, 28), 1, FMNIST_MEAN, FMNIST_STD), TrainConfig(batch_size=4),
                      torch.device("cpu"), None, channels_last=True)
    store = SnapshotStore(tmp_path, keep=50)
    extras = SnapshotExports(STUDENT, ["onnx", "torchscript"])
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer")
    pending: Future | None = None
    published, step, last_snap, exporting_steps = [], 0, 0, 0
    try:
        # At least 300 steps, and on until 3 exported snapshots were published beside them.
        while step < 300 or len(published) < 3:
            assert step < 200_000, "the exports never finished"
            x = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
            with torch.inference_mode():
                t_logits = teacher(learner.spec(x))
            exporting_steps += torch.compiler.is_exporting()  # process-global: true during an in-process export
            stats = learner.step(x, t_logits, torch.full((4,), -1))
            assert torch.isfinite(stats).all()
            step += 1
            if pending is not None and pending.done():
                published.append(pending.result())  # re-raises a failed publish
                pending = None
            if pending is None and step - last_snap >= 5:  # snapshot.every_steps = 5
                pending = writer.submit(store.publish, learner.weights(), {"step": step, "student": STUDENT},
                                        write_extras=extras)
                last_snap = step
        if pending is not None:
            published.append(pending.result())
    finally:
        writer.shutdown(wait=True)
    assert len(published) >= 3
    assert exporting_steps == 0, f"{exporting_steps} of {step} training steps ran while this process was exporting"
    for m in published:  # every snapshot has both exports, hashed into its manifest
        assert {"model.onnx", "model.pt", "config.pbtxt"} <= set(m["files"])
    # The newest export serves the weights it was published with.
    newest = published[-1]
    vdir = tmp_path / str(newest["version"])
    model = build_model("streamkd:lenet5", 10, in_channels=1, input_size=(28, 28))
    from streamkd.learn.models import load_state_dict_file

    model.load_state_dict(load_state_dict_file(vdir / "model.safetensors"))
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert (torch.jit.load(str(vdir / "model.pt"))(x) - model.eval()(x)).abs().max() < 1e-4
