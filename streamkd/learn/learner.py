"""The online step: teacher labels a batch, the student is scored (prequentially), then learns from it.

Nothing here reads a tensor back to the host: each step returns a small
stats tensor on the device, and the loop reads it one step later, so the GPU
never waits for Python. The non-finite guard is on the device too: the fused
optimizers accept a ``found_inf`` flag (the mechanism ``torch.amp.GradScaler``
uses) and skip the update inside the kernel when it is set.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from streamkd.config import TrainConfig
from streamkd.learn.accel import native_bf16, optimize_for_inference
from streamkd.learn.device import autocast as _autocast
from streamkd.learn.device import resolve_device as resolve_device  # imported from here by the daemon
from streamkd.learn.loss import kd_loss
from streamkd.learn.preprocess import to_model_input

log = logging.getLogger(__name__)

# Layout of the per-step stats vector (float32, on the device).
STATS = ("n", "n_finite", "loss", "kd", "ce", "agree", "labelled", "correct", "skipped")
S = {name: i for i, name in enumerate(STATS)}


PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device, *, inference: bool = False) -> torch.dtype | None:
    """Autocast dtype for a forward pass; None for fp32.

    ``auto`` for training (the student): bf16 on CUDA, fp32 on CPU. ``auto`` for inference
    (the teacher): bf16 wherever the hardware has native bf16 math (see ``accel.native_bf16``),
    fp16 on CUDA GPUs without it, fp32 elsewhere.
    """
    if precision == "auto":
        if inference:
            precision = "bf16" if native_bf16(device) else "fp16" if device.type == "cuda" else "fp32"
        else:
            precision = "bf16" if device.type == "cuda" else "fp32"
    return PRECISIONS[precision]


def precision_name(dtype: torch.dtype | None) -> str:
    return next(name for name, d in PRECISIONS.items() if d is dtype)


@dataclass(frozen=True)
class InputSpec:
    """How a model wants its input: size (H, W), channels, per-channel mean/std."""

    size: tuple[int, int]
    channels: int
    mean: Sequence[float]
    std: Sequence[float]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return to_model_input(images, self.size, self.channels, self.mean, self.std)


def model_input(spec: InputSpec, images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 N×C×H×W -> a model's float input: ``spec``'s size and normalisation, NHWC when ``channels_last``
    (a channels_last model fed NCHW input converts it in every layer)."""
    x = spec(images)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class Teacher:
    """A frozen model that turns a uint8 batch into float32 logits (N×K)."""

    def __init__(self, model: nn.Module, spec: InputSpec, device: torch.device, amp: torch.dtype | None,
                 channels_last: bool = False, compile: bool = False):
        self.spec, self.device, self.amp = spec, device, amp
        # channels_last pays on CUDA (tensor cores) and on CPU (oneDNN), see accel.py.
        self.channels_last = channels_last
        model = model.to(device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        model = optimize_for_inference(model, self.channels_last)
        self.model = torch.compile(model) if compile else model

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with _autocast(self.device, self.amp):
            return self.model(model_input(self.spec, images, self.channels_last)).float()


class Learner:
    """The student and its optimizer; :meth:`step` = score, then learn, on one batch."""

    def __init__(self, student: nn.Module, spec: InputSpec, cfg: TrainConfig, device: torch.device,
                 amp: torch.dtype | None, channels_last: bool = False, compile: bool = False):
        self.cfg, self.spec, self.device = cfg, spec, device
        # fp16 needs loss scaling for training; the student stays in fp32 then (teacher.precision is separate).
        self.amp = amp if amp is not torch.float16 else None
        # channels_last pays for the student too: oneDNN's NHWC kernels (max-pooling among them) are faster
        # than NCHW ones on the CPU, and on CUDA it is what tensor cores want (README "Results" has figures).
        self.channels_last = channels_last
        self.student = student.to(device).train()
        if self.channels_last:
            self.student = self.student.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.student) if compile else self.student
        self.optimizer = make_optimizer(self.student.parameters(), cfg)
        self.fused = bool(self.optimizer.defaults.get("fused"))
        warmup = cfg.warmup_steps
        self.lr_scale = 1.0  # a temporary factor on the learning rate (after a drift); applies from the next step
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: (min(1.0, (s + 1) / warmup) if warmup else 1.0) * self.lr_scale)
        # The fresh rows' predictions and confidence (max softmax) before the last update, on the device.
        self.last_pred: torch.Tensor | None = None
        self.last_confidence: torch.Tensor | None = None
        # Every row's KL(teacher ‖ student) at temperature T before the last update (device; replay priorities).
        self.last_divergence: torch.Tensor | None = None

    def step(self, images: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
             fresh: int | None = None, weight: torch.Tensor | None = None) -> torch.Tensor:
        """One prequential update. images uint8 N×C×H×W, teacher_logits float N×K, labels int64 N (-1: none).

        The first ``fresh`` rows (default: all) are new to the lineage; the rest are replayed. All rows
        train; only fresh rows are scored and counted (``n``, ``agree``, ``correct``...), so the prequential
        figures and ``samples_seen`` describe the stream. ``weight``: optional float N, each row's weight
        in the loss (see ``kd_loss``). Returns the stats vector (float32, device; layout ``STATS``). No host
        sync.
        """
        fresh = images.shape[0] if fresh is None else fresh
        x = self.model_input(images)
        # Samples whose teacher logits are not finite are dropped from this update (counted, not trained).
        finite = torch.isfinite(teacher_logits).all(dim=1)
        with _autocast(self.device, self.amp):
            logits = self.forward(x)
        logits = logits.float()
        # Prequential score: these logits come from the weights *before* this batch's update.
        pred = logits.detach().argmax(1)
        new = torch.arange(finite.numel(), device=finite.device) < fresh
        agree = ((pred == teacher_logits.argmax(1)) & finite & new).sum()
        has_label = (labels >= 0) & new
        correct = ((pred == labels) & has_label).sum()
        self.last_pred = pred[:fresh]
        self.last_confidence = logits.detach()[:fresh].softmax(1).amax(1)
        safe_t = torch.where(finite[:, None], teacher_logits, logits.detach())  # KL 0 on dropped rows
        safe_y = torch.where(finite, labels, torch.full_like(labels, -1))
        out = kd_loss(logits, safe_t, safe_y, self.cfg.temperature, self.cfg.alpha, form=self.cfg.loss,
                      weight=weight)
        self.last_divergence = out.divergence
        n_finite = finite.sum()
        # batchmean divided by N: rescale so dropped rows do not dilute the update.
        scale = finite.numel() / n_finite.clamp(min=1).float()
        loss = out.total * scale
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.student.parameters() if p.grad is not None]
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip, foreach=True)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        bad = (~torch.isfinite(norm) | ~torch.isfinite(loss) | (n_finite == 0)).float()
        if self.fused:
            self.optimizer.found_inf = bad  # the fused kernel skips the whole update when set
            self.optimizer.step()
            del self.optimizer.found_inf
        elif not bool(bad):  # unfused fallback: costs one host sync per step
            self.optimizer.step()
        self.scheduler.step()
        return torch.stack([
            torch.full((), float(fresh), device=self.device), (finite & new).sum().float(),  # a fill, not a copy
            loss.detach().float(), out.kd.detach().float() * scale, out.ce.detach().float(), agree.float(),
            has_label.sum().float(), correct.float(), bad,
        ])

    def model_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N×C×H×W (on the student's device) -> the student's float input, in its memory format."""
        return model_input(self.spec, images, self.channels_last)

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """The student's logits (float32 N×K) for uint8 images, without learning: eval mode, no gradients."""
        x = self.model_input(images)
        self.student.eval()
        try:
            with _autocast(self.device, self.amp):
                return self.forward(x).float()
        finally:
            self.student.train()

    def warmup(self, images: torch.Tensor) -> None:
        """Forward + backward on ``images`` (uint8, the batch shape the loop will see) so compilation and
        kernel selection happen now, not inside the first real step. Leaves no trace: weights and the
        optimizer are not touched, BatchNorm statistics and the RNG are restored, gradients are dropped."""
        buffers = {k: v.clone() for k, v in self.student.named_buffers()}
        rng = torch.random.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        try:
            with _autocast(self.device, self.amp):
                logits = self.forward(self.model_input(images))
            logits.float().sum().backward()
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for k, v in self.student.named_buffers():
                    v.copy_(buffers[k])
            torch.random.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, self.device)

    # -- checkpoint state ------------------------------------------------------------------
    def weights(self) -> dict[str, torch.Tensor]:
        """CPU copies of the student weights (what a snapshot publishes; safe to write from another thread)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.student.state_dict().items()}

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """CPU copies of the student weights and optimizer state (what a checkpoint keeps)."""
        opt = _to_cpu(self.optimizer.state_dict())
        opt["scheduler"] = self.scheduler.state_dict()
        return self.weights(), opt

    def load_state(self, weights: dict[str, torch.Tensor], optimizer: dict | None) -> None:
        self.student.load_state_dict(weights)
        if optimizer:
            optimizer = dict(optimizer)
            sched = optimizer.pop("scheduler", None)
            self.optimizer.load_state_dict(optimizer)
            if sched:
                self.scheduler.load_state_dict(sched)


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD, fused where this torch supports it (needed for the sync-free non-finite guard)."""
    params = list(params)
    for fused in (True, False):
        try:
            if cfg.optimizer == "adamw":
                return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
            return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                   fused=fused or None)
        except (RuntimeError, TypeError, ValueError) as e:
            log.debug("fused %s unavailable (%s); using the foreach implementation", cfg.optimizer, e)
    raise AssertionError("unreachable")


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
