"""An exponential moving average of the student's weights, for serving.

The weights that train jump with every batch; their moving average is
smoother and, on a stream, usually better than the latest step. The average
covers parameters *and* floating-point buffers (BatchNorm running mean and
variance), so the statistics match the averaged weights; integer buffers
(``num_batches_tracked``) are copied.

``torch.optim.swa_utils.AveragedModel`` does not fit the loop: its update reads
its step counter back from the device on every call (a host sync per step on
a GPU), and with ``use_buffers=True`` it averages integer buffers in float and
truncates, which freezes ``num_batches_tracked``. So this class keeps the
counter on the host and applies the library's EMA kernel
(``get_ema_multi_avg_fn``) to the floating-point tensors only.

Early on the average would be dominated by the initial weights; as in
``tf.train.ExponentialMovingAverage`` the decay used at update t is
``min(decay, (1 + t) / (10 + t))`` unless ``warmup=False``.

After the stream changes, the average lags the student by about ``1 / (1 - decay)`` updates, and serves
the old content's weights that long. :meth:`Ema.follow` lowers the decay for a while (starting at a given
value and rising linearly back to ``decay``), so the served weights catch up with a student that is
relearning, then smooth again.
"""

from __future__ import annotations

import copy
from collections import defaultdict

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

__all__ = ["Ema", "unwrap"]


def unwrap(model: nn.Module) -> nn.Module:
    """The module behind a ``torch.compile`` wrapper (or the module itself)."""
    return getattr(model, "_orig_mod", model)


def _members(model: nn.Module) -> list[tuple[str, dict, str]]:
    """Where each parameter, then each buffer, lives: ``(name, owning module's dict, key)``, in the order of
    ``named_parameters()`` then ``named_buffers()`` (a tensor shared by two modules once)."""
    out, seen = [], set()
    for attr in ("_parameters", "_buffers"):
        for prefix, mod in model.named_modules():
            for key, t in getattr(mod, attr).items():
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    out.append((f"{prefix}.{key}" if prefix else key, getattr(mod, attr), key))
    return out


class _Plan:
    """The EMA's tensors paired with a model's, found once per model: walking a module tree costs more than
    the average itself on a small student. Each update reads the model's tensors from their owners' dicts,
    so a buffer that was replaced (``module.to``) is still the one averaged."""

    def __init__(self, ema: nn.Module, model: nn.Module) -> None:
        mine, theirs = _members(ema), _members(model)
        if [n for n, _, _ in mine] != [n for n, _, _ in theirs]:
            raise ValueError("model does not have the structure the EMA was built from")
        self.model = model
        self._pairs = [(d1, k1, d2, k2) for (_, d1, k1), (_, d2, k2) in zip(mine, theirs, strict=True)]
        # The floating-point ones grouped by the EMA tensor's device and dtype (one fused kernel per group);
        # the others (integer buffers) are copied.
        groups: dict[tuple[torch.device, torch.dtype], tuple[list, list]] = defaultdict(lambda: ([], []))
        self._copied = []
        for d1, k1, d2, k2 in self._pairs:
            e = d1[k1]
            if e.is_floating_point():
                ema_list, owners = groups[(e.device, e.dtype)]
                ema_list.append(e)
                owners.append((d2, k2))
            else:
                self._copied.append((d1, k1, d2, k2))
        self._groups = [(device, ema_list, owners) for (device, _), (ema_list, owners) in groups.items()]

    def tensors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(d1[k1], d2[k2]) for d1, k1, d2, k2 in self._pairs]

    def average(self, decay: float) -> None:
        """``ema = decay * ema + (1 - decay) * model`` for the floating-point tensors; the others are copied."""
        avg = get_ema_multi_avg_fn(decay)
        for device, ema_list, owners in self._groups:
            avg(ema_list, [d[k].to(device) for d, k in owners], None)
        for d1, k1, d2, k2 in self._copied:
            d1[k1].copy_(d2[k2])


class Ema:
    """EMA copy of a model: ``ema = d * ema + (1 - d) * model`` per floating tensor at each :meth:`update`.

    ``module`` is the averaged copy (eval mode, no gradients, on the model's device and memory format):
    score or serve it. The first update copies the model.
    """

    def __init__(self, model: nn.Module, decay: float, *, warmup: bool = True) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay!r}")
        self.decay, self.warmup = float(decay), warmup
        self.module = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
        self.updates = 0  # host-side counter: reading it costs no device sync
        self._plan: _Plan | None = None  # the last model's tensors, paired with ours
        self.follow_decay, self.follow_steps, self.follow_remaining = self.decay, 0, 0

    def follow(self, decay: float, steps: int) -> None:
        """Follow the model more closely for the next ``steps`` updates: the decay starts at ``decay`` and rises
        linearly back to the configured one over them (a decay above the configured one changes nothing).
        Calling it again restarts the period."""
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"follow decay must be in [0, 1], got {decay!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"follow steps must be an integer >= 0, got {steps!r}")
        self.follow_decay, self.follow_steps, self.follow_remaining = float(decay), steps, steps

    def current_decay(self) -> float:
        """The decay the next update applies."""
        decay = self.decay
        if self.follow_remaining > 0:
            done = 1.0 - self.follow_remaining / self.follow_steps
            decay = min(decay, self.follow_decay + (self.decay - self.follow_decay) * done)
        if self.warmup:
            return min(decay, (1 + self.updates) / (10 + self.updates))
        return decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights and buffers in. Pass the training model (compiled or not)."""
        model = unwrap(model)
        if self._plan is None or self._plan.model is not model:
            self._plan = _Plan(self.module, model)
        if self.updates == 0:
            for e, m in self._plan.tensors():
                e.copy_(m)
        else:
            self._plan.average(self.current_decay())
        self.updates += 1
        self.follow_remaining = max(0, self.follow_remaining - 1)

    def weights(self) -> dict[str, torch.Tensor]:
        """CPU, contiguous copies of the averaged state_dict, floating tensors in fp32: ready to publish."""
        out = {}
        for k, v in self.module.state_dict().items():
            dtype = torch.float32 if v.is_floating_point() else v.dtype
            out[k] = v.detach().to("cpu", dtype, copy=True).contiguous()
        return out

    # -- checkpoint state ------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Tensors only: the averaged state_dict (CPU copies, stored dtype), the update count and the follow
        period (:meth:`follow`) in progress."""
        weights = {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}
        follow = torch.tensor([self.follow_decay, self.follow_steps, self.follow_remaining], dtype=torch.float64)
        return {"weights": weights, "updates": torch.tensor(self.updates, dtype=torch.int64), "follow": follow}

    def load_state_dict(self, state: dict) -> None:
        weights, updates = state.get("weights"), state.get("updates")
        if not isinstance(weights, dict) or not isinstance(updates, torch.Tensor) or updates.numel() != 1:
            raise ValueError("not an EMA state (needs 'weights' and 'updates')")
        follow = state.get("follow")  # absent in states saved before follow periods existed
        if follow is not None and (not isinstance(follow, torch.Tensor) or follow.numel() != 3):
            raise ValueError("not an EMA state ('follow' must hold decay, steps, remaining)")
        self.module.load_state_dict(weights)  # copies into the existing tensors: device and memory format stay
        self.updates = int(updates)
        if follow is None:
            self.follow_decay, self.follow_steps, self.follow_remaining = self.decay, 0, 0
        else:
            decay, steps, remaining = follow.tolist()
            steps = max(0, int(steps))
            self.follow_decay = min(1.0, max(0.0, float(decay)))
            self.follow_steps, self.follow_remaining = steps, min(steps, max(0, int(remaining)))
