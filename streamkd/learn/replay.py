"""A bounded in-memory buffer of teacher-labelled samples to replay alongside fresh ones.

Training each record once on a stream whose content changes forgets what
came before; replaying stored (image, teacher logits) pairs keeps it. The
buffer's slots form two regions, both in preallocated CPU tensors:

- the **reservoir**: Algorithm R over every sample offered, so at any time
  it is a uniform sample of the whole stream seen so far;
- the **recent region**: a ring holding the latest samples (FIFO), so a
  ``recency_share`` of each replayed batch comes from the current content.

The recent region gets ``recency_share`` of the slots, so every stored slot
is equally likely to be replayed. Replayed samples are drawn with
replacement (O(n) per draw, whatever the capacity).

With ``balance`` on, both the reservoir and the draws from it are balanced
over the teacher's top-1 classes (a stream usually has no labels):

- the reservoir keeps itself with class-balancing reservoir sampling (CBRS,
  Chrysakis & Moens 2020, "Online Continual Learning from Imbalanced
  Data"): once it is full, a sample of a class that is not *full* (a full
  class is the largest, or was the largest at some point) replaces a random
  sample of a largest class; a sample of a full class ``c`` replaces a
  random stored sample of ``c`` with probability ``stored_c / seen_c``
  (Algorithm R within the class). A class that is rare in the stream keeps
  as many samples as the others, up to all of those it sent; on a balanced
  stream it is the plain reservoir;
- the reservoir's draws fill up the classes the rest of the step lacks: the
  fresh samples and the recent-region draws follow the stream's recent class
  frequencies (a moving average over about ``RECENT_WINDOW`` samples), and
  the reservoir's share goes to the classes it holds by water-filling, so
  the step is as close to class-balanced as its size allows, uniform within
  a class. On a stream whose classes arrive in turn, this keeps the classes
  of the past in a fair share of each step instead of the share they have
  in a uniform draw; on a balanced stream it is the uniform draw.

With a ``priority`` exponent α > 0 the reservoir's draws are prioritized
(Schaul et al. 2016, "Prioritized Experience Replay"): slot i is drawn with
probability ∝ (p_i + ε)^α, where p_i is the sample's divergence from the
teacher (KL at the distillation temperature) when it was last trained on:
its own fresh step when it was stored, then each step that replayed it. The
student then spends its replayed rows where it still disagrees with the
teacher instead of on samples it has learnt. α = 0 draws uniformly; the
recent region's draws, and the draws of a balanced reservoir within a class,
are always uniform.

The per-sample CBRS decisions run over Python ints (O(1) each, no tensor
op per sample); the stores are one indexed write per batch.

:meth:`ReplayBuffer.protect` freezes the reservoir for the next N offered
samples (meant for a detected drift: the old content stays while the new
one only reaches the recent region). Samples offered meanwhile still count
in ``seen``, so afterwards new samples enter the reservoir at the rate they
would have without the pause.

All randomness comes from one ``torch.Generator`` seeded at construction and
saved in :meth:`state_dict`, so a buffer restored from a checkpoint
(``torch.load(weights_only=True)``) continues exactly as the original would.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = ["Draw", "ReplayBuffer", "bytes_per_sample"]

FORMAT = 1
PRIORITY_EPS = 0.01  # ε of the prioritized draws: a sample the student matches keeps a small chance
_PRIORITY_MAX = 1e4  # priorities are clamped to [0, this]
RECENT_WINDOW = 500  # samples: the span of the recent class frequencies that balanced draws complement
_FP16_MAX = float(torch.finfo(torch.float16).max)


def bytes_per_sample(image_shape: tuple[int, ...], num_classes: int) -> int:
    """Bytes one stored sample takes: uint8 image + fp16 logits + int64 label."""
    return int(torch.Size(image_shape).numel()) + 2 * num_classes + 8


class Draw(NamedTuple):
    """Replayed samples: copies of the stored rows, and the slots they came from."""

    images: torch.Tensor  # uint8 n×C×H×W
    logits: torch.Tensor  # float32 n×K
    labels: torch.Tensor  # int64 n
    slots: torch.Tensor  # int64 n


def _priorities(p: torch.Tensor) -> torch.Tensor:
    """Divergences as stored priorities: float32 on the CPU (a sync point on an accelerator), NaN as 1, clamped to
    [0, _PRIORITY_MAX]."""
    p = p.detach().to("cpu", torch.float32)
    return p.nan_to_num(nan=1.0, posinf=_PRIORITY_MAX, neginf=0.0).clamp_(0.0, _PRIORITY_MAX)


def _words(images: torch.Tensor) -> torch.Tensor:
    """A contiguous uint8 N×... tensor seen as N rows of the widest integer words that divide a row's bytes."""
    row = math.prod(images.shape[1:])
    dtype = next(d for d in (torch.int64, torch.int32, torch.int16, torch.uint8) if row % d.itemsize == 0)
    return images.view(images.shape[0], row).view(dtype)


def check_batch(images: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Raise ValueError unless images is uint8 N×C×H×W, logits float N×K and labels integer N."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"images must be uint8 N×C×H×W, got {images.dtype} {tuple(images.shape)}")
    if not logits.is_floating_point() or logits.dim() != 2 or logits.shape[0] != images.shape[0]:
        raise ValueError(f"logits must be float N×K with N={images.shape[0]}, got {logits.dtype} {tuple(logits.shape)}")
    if labels.is_floating_point() or labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels must be integer N with N={images.shape[0]}, got {labels.dtype} {tuple(labels.shape)}")


class ReplayBuffer:
    """Reservoir + recent ring of (uint8 image, fp16 teacher logits, int64 label) samples on the CPU.

    capacity: most samples held (both regions together); max_bytes: most bytes held, so the
    effective capacity is ``min(capacity, max_bytes // bytes_per_sample)``, fixed by the first
    sample's shape. recency_share: in [0, 1], the share of slots in the recent region and of each
    :meth:`sample` drawn from it (0: reservoir only; 1: a plain FIFO of the latest samples).
    balance: class-balanced reservoir and draws over the teacher's top-1 classes (module docstring).
    priority: the exponent α of prioritized reservoir draws, >= 0 (0: uniform; module docstring).
    """

    def __init__(self, capacity: int, max_bytes: int, recency_share: float, seed: int,
                 balance: bool = False, priority: float = 0.0) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, got {capacity!r}")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"max_bytes must be an integer >= 1, got {max_bytes!r}")
        if not 0.0 <= recency_share <= 1.0:
            raise ValueError(f"recency_share must be in [0, 1], got {recency_share!r}")
        if isinstance(priority, bool) or not isinstance(priority, int | float) or not 0.0 <= priority < float("inf"):
            raise ValueError(f"priority must be a finite number >= 0, got {priority!r}")
        self.priority = float(priority)
        self.capacity, self.max_bytes, self.recency_share = capacity, max_bytes, float(recency_share)
        self.balance = bool(balance)
        self._gen = torch.Generator().manual_seed(int(seed))
        self.seen = 0  # samples offered to add() (finite logits), stored or not
        self.revision = 0  # add() calls that changed the stored content
        self._protect_until = 0  # the reservoir is frozen while seen < this
        self._images: torch.Tensor | None = None  # slots × C×H×W, reservoir slots first, then the ring
        self._logits: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        self._res_cap = self._ring_cap = 0
        self._res_len = self._ring_len = self._ring_head = 0
        self._stamps: torch.Tensor | None = None
        self._prio: torch.Tensor | None = None  # float32 per slot: the divergence last measured (see priority)
        self._writes = 0  # writes so far (in this process): a slot's stamp says which one filled it
        # Balance (saved): samples offered per class, classes that have been the largest, recent frequencies.
        self._class_seen: list[int] = []
        self._full: list[bool] = []
        self._recent: torch.Tensor | None = None  # float64 K
        # Balance (derived from the stored logits, rebuilt on load): each reservoir slot's class, and
        # per class its slots (``_where[s]``: the position of slot s in ``_slots[class]``).
        self._slot_cls: list[int] = []
        self._slots: list[list[int]] = []
        self._where: list[int] = []
        self._index: tuple[torch.Tensor, ...] | None = None  # cache of _balanced_draw, None: stale

    # -- sizes -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._res_len + self._ring_len

    @property
    def slots(self) -> int:
        """Effective capacity (0 until the first sample fixes the shape)."""
        return self._res_cap + self._ring_cap

    @property
    def nbytes(self) -> int:
        """Bytes of the preallocated storage (0 until the first sample)."""
        if self._images is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self._images, self._logits, self._labels))

    @property
    def protected(self) -> bool:
        """True while the reservoir is frozen by :meth:`protect`."""
        return self.seen < self._protect_until

    # -- writing -----------------------------------------------------------------------------
    def _allocate(self, shape: tuple[int, ...], k: int) -> None:
        per = bytes_per_sample(shape, k)
        slots = min(self.capacity, self.max_bytes // per)
        if slots < 1:
            raise ValueError(f"max_bytes={self.max_bytes} holds no sample of {per} bytes "
                             f"(images {tuple(shape)}, {k} logits)")
        share = self.recency_share
        self._ring_cap = 0 if share == 0.0 else min(slots, max(1, round(slots * share)))
        self._res_cap = slots - self._ring_cap
        self._images = torch.zeros((slots, *shape), dtype=torch.uint8)
        self._logits = torch.zeros((slots, k), dtype=torch.float16)
        self._labels = torch.full((slots,), -1, dtype=torch.int64)
        self._stamps = torch.zeros((slots,), dtype=torch.int64)  # per slot: the write that filled it
        self._prio = torch.ones((slots,), dtype=torch.float32)
        if self.balance:
            self._slot_cls, self._where = [-1] * self._res_cap, [-1] * self._res_cap
            self._slots = [[] for _ in range(k)]
            self._class_seen, self._full = [0] * k, [False] * k
            self._recent = torch.full((k,), 1.0 / k, dtype=torch.float64)
            self._index = None

    def _write(self, slots: torch.Tensor, src: torch.Tensor, images, logits, labels, priority=None) -> None:
        assert self._images is not None and self._logits is not None and self._labels is not None
        assert self._prio is not None
        # index_copy_/index_select: several times faster than advanced indexing on uint8 images, and index_copy_
        # faster still on the images' bytes seen as wider words. Slots are unique within a write (callers
        # resolve a slot picked twice), as index_copy_ needs.
        _words(self._images).index_copy_(0, slots, _words(images.index_select(0, src)))
        self._logits.index_copy_(0, slots, logits.index_select(0, src))
        self._labels.index_copy_(0, slots, labels.index_select(0, src))
        self._writes += 1
        self._stamps.index_fill_(0, slots, self._writes)
        if priority is None:
            self._prio.index_fill_(0, slots, 1.0)
        else:
            self._prio.index_copy_(0, slots, priority.index_select(0, src))

    def add(self, images: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
            priority: torch.Tensor | None = None) -> None:
        """Offer a batch: images uint8 N×C×H×W, teacher logits float N×K, labels int N (-1: none), and
        optionally each sample's priority (float N: its divergence from the teacher; 1 when not given).

        Inputs on an accelerator are copied to the host here (a sync point). Rows whose logits
        are not finite are neither stored nor counted. Logits are stored as fp16 (clamped to its range).
        """
        check_batch(images, logits, labels)
        if priority is not None and (not priority.is_floating_point() or priority.shape != labels.shape):
            raise ValueError(f"priority must be float N with N={labels.shape[0]}, got {priority.dtype} "
                             f"{tuple(priority.shape)}")
        images = images.detach().to("cpu")
        logits = logits.detach().to("cpu", torch.float32)
        labels = labels.detach().to("cpu", torch.int64)
        priority = _priorities(priority) if priority is not None else None
        finite = torch.isfinite(logits).all(dim=1)
        if not bool(finite.all()):
            images, logits, labels = images[finite], logits[finite], labels[finite]
            priority = priority[finite] if priority is not None else None
        n = int(images.shape[0])
        if n == 0:
            return
        shape, k = tuple(images.shape[1:]), int(logits.shape[1])
        if self._images is None:
            self._allocate(shape, k)
        elif tuple(self._images.shape[1:]) != shape or self._logits.shape[1] != k:
            raise ValueError(f"samples must keep the shape of the first ones: images {tuple(self._images.shape[1:])}"
                             f" and {self._logits.shape[1]} logits, got {shape} and {k}")
        logits = logits.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)
        # Which slot gets which row is worked out on Python ints (a batch is a few dozen rows, where each tensor
        # op costs more than the loop), then stored with one indexed write.
        writes: dict[int, int] = {}  # slot -> batch row

        if self._ring_cap:  # the latest samples, oldest overwritten first
            m = min(n, self._ring_cap)
            for i in range(m):
                writes[self._res_cap + (self._ring_head + i) % self._ring_cap] = n - m + i
            self._ring_head = (self._ring_head + m) % self._ring_cap
            self._ring_len = min(self._ring_len + m, self._ring_cap)

        if self._res_cap and self.balance:
            self._add_balanced(logits, writes)
        elif self._res_cap:
            # Algorithm R: sample number t (0-based) replaces a uniform slot with probability cap/(t+1).
            # One draw per sample offered, used or not, so the random stream does not depend on the fill.
            u = torch.rand(n, generator=self._gen, dtype=torch.float64).tolist()
            for i in range(max(0, self._protect_until - self.seen), n):
                if self._res_len < self._res_cap:
                    writes[self._res_len] = i
                    self._res_len += 1
                    continue
                t = self.seen + i
                j = int(u[i] * (t + 1))  # the float64 product, truncated
                if j < self._res_cap:
                    writes[j] = i  # a later sample wins a slot picked twice, as one at a time

        if writes:
            self._write(torch.tensor(list(writes), dtype=torch.int64),
                        torch.tensor(list(writes.values()), dtype=torch.int64), images, logits, labels, priority)
        if self.balance:
            assert self._recent is not None
            keep = (1.0 - 1.0 / RECENT_WINDOW) ** n
            hist = torch.bincount(logits.argmax(1), minlength=k).to(torch.float64) / n
            self._recent.mul_(keep).add_(hist, alpha=1.0 - keep)
        self.seen += n
        self.revision += int(bool(writes))

    def _place(self, slot: int, c: int) -> None:
        """Record that reservoir ``slot`` now holds a sample of class ``c`` (balance bookkeeping)."""
        old = self._slot_cls[slot]
        if old >= 0:  # swap-remove the slot from its old class's list
            lst, pos = self._slots[old], self._where[slot]
            last = lst.pop()
            if last != slot:
                lst[pos] = last
                self._where[last] = pos
        self._slot_cls[slot] = c
        self._where[slot] = len(self._slots[c])
        self._slots[c].append(slot)

    def _add_balanced(self, logits: torch.Tensor, writes: dict[int, int]) -> None:
        """CBRS over the batch (module docstring): the reservoir slots it stores, as slot -> batch row in
        ``writes`` (a later sample wins a slot written twice)."""
        n = int(logits.shape[0])
        classes = logits.argmax(1).tolist()
        u = torch.rand((n, 3), generator=self._gen, dtype=torch.float64).tolist()  # one row per sample, always
        moved = False  # whether a slot changed class
        counts = [len(lst) for lst in self._slots]
        for i, c in enumerate(classes):
            if self.seen + i < self._protect_until:
                continue
            self._class_seen[c] += 1
            if self._res_len < self._res_cap:
                slot = self._res_len
                self._res_len += 1
            elif not self._full[c]:
                top = max(counts)
                largest = [j for j, m in enumerate(counts) if m == top]
                victim = largest[int(u[i][0] * len(largest))]
                lst = self._slots[victim]
                slot = lst[int(u[i][1] * len(lst))]
                counts[victim] -= 1
            elif u[i][2] * self._class_seen[c] < counts[c]:  # within the class: the counts stay
                lst = self._slots[c]
                writes[lst[int(u[i][1] * len(lst))]] = i
                continue
            else:
                continue
            self._place(slot, c)
            counts[c] += 1
            writes[slot] = i
            moved = True
            if self._res_len == self._res_cap:  # the class sizes moved: the largest ones are full from now on
                top = max(counts)
                for j, m in enumerate(counts):
                    if m == top:
                        self._full[j] = True
        if moved:
            self._index = None

    def protect(self, samples: int) -> None:
        """Freeze the reservoir for the next ``samples`` offered samples (they still reach the recent region).

        Extends, never shortens, a protection already running. ``protect(0)`` is a no-op.
        """
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
            raise ValueError(f"samples must be an integer >= 0, got {samples!r}")
        self._protect_until = max(self._protect_until, self.seen + samples)

    # -- reading -----------------------------------------------------------------------------
    def sample(self, n: int, fresh: int = 0, recent: float | None = None) -> Draw | None:
        """n stored samples drawn with replacement: uint8 images n×C×H×W, float32 logits n×K, int64 labels n,
        and their slots (for :meth:`reprioritize`).

        A ``recency_share`` of them (``recent``, when given), stochastically rounded, comes from the recent
        region while both regions hold samples. The reservoir's share is drawn by priority when ``priority``
        > 0; with ``balance``, it complements ``fresh`` rows of the step (and the recent draws) at the recent
        class frequencies. None when the buffer is empty or n == 0. Returns copies.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an integer >= 0, got {n!r}")
        if isinstance(fresh, bool) or not isinstance(fresh, int) or fresh < 0:
            raise ValueError(f"fresh must be an integer >= 0, got {fresh!r}")
        if recent is not None and not 0.0 <= recent <= 1.0:
            raise ValueError(f"recent must be in [0, 1], got {recent!r}")
        if n == 0 or len(self) == 0:
            return None
        assert self._images is not None and self._logits is not None and self._labels is not None
        if self._ring_len == 0:
            k = 0
        elif self._res_len == 0:
            k = n
        else:
            want = n * (self.recency_share if recent is None else recent)
            k = int(want) + int(torch.rand((), generator=self._gen, dtype=torch.float64) < want - int(want))
        if self.balance and self._res_len and n > k:
            res = self._balanced_draw(n - k, k + fresh)
        elif self.priority and self._res_len and n > k:
            assert self._prio is not None
            weights = (self._prio[:self._res_len] + PRIORITY_EPS).pow_(self.priority)
            res = torch.multinomial(weights, n - k, replacement=True, generator=self._gen)
        else:
            res = torch.randint(0, max(self._res_len, 1), (n - k,), generator=self._gen)
        idx = torch.cat([res, self._res_cap + torch.randint(0, max(self._ring_len, 1), (k,), generator=self._gen)])
        return Draw(*self._take(idx), idx)

    def class_counts(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Stored samples per teacher top-1 class (float64 K each): the reservoir's and the ring's; None when
        empty."""
        if self._logits is None or not len(self):
            return None
        k = int(self._logits.shape[1])
        top1 = self._logits.float().argmax(1)
        res = top1[:self._res_len]
        ring = top1[self._res_cap:self._res_cap + self._ring_len]
        return (torch.bincount(res, minlength=k).to(torch.float64), torch.bincount(ring, minlength=k).to(torch.float64))

    def ring_share(self, recent: float | None = None) -> float:
        """The expected share of a :meth:`sample` draw that comes from the recent region (``recent`` as there)."""
        if self._ring_len == 0:
            return 0.0
        if self._res_len == 0:
            return 1.0
        return self.recency_share if recent is None else recent

    def reprioritize(self, slots: torch.Tensor, divergence: torch.Tensor) -> None:
        """Set the priority of ``slots`` (from :meth:`sample`, before any later :meth:`add`) to the divergence
        just measured on them (float, one per slot; a slot drawn twice keeps the larger)."""
        if slots.shape != divergence.shape:
            raise ValueError(f"one divergence per slot: {tuple(slots.shape)} slots, {tuple(divergence.shape)} values")
        if self._prio is None or not slots.numel():
            return
        self._prio.scatter_reduce_(0, slots, _priorities(divergence), "amax", include_self=False)

    def _take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Copies of slots ``idx``: uint8 images, float32 logits, int64 labels."""
        assert self._images is not None and self._logits is not None and self._labels is not None
        return self._images.index_select(0, idx), self._logits.index_select(0, idx).float(), \
            self._labels.index_select(0, idx)

    def _balanced_draw(self, n: int, others: int) -> torch.Tensor:
        """n reservoir slots whose classes fill up what ``others`` rows at the recent class frequencies lack."""
        assert self._recent is not None
        if self._index is None:  # the reservoir's slots grouped by class; rebuilt when its content changed
            cls = torch.tensor(self._slot_cls[:self._res_len], dtype=torch.int64)
            counts = torch.bincount(cls, minlength=self._recent.numel())
            self._index = (torch.argsort(cls, stable=True), counts, counts.cumsum(0) - counts,
                           torch.nonzero(counts).squeeze(1))
        order, counts, start, held = self._index
        have = (others * self._recent[held]).sort()
        # Water-filling: the level L with sum(max(0, L - have)) = n, over the classes held.
        level = (n + have.values.cumsum(0)) / torch.arange(1, held.numel() + 1, dtype=torch.float64)
        m = int((have.values <= level).nonzero().max())
        want = torch.zeros(held.numel(), dtype=torch.float64)
        want[have.indices] = (level[m] - have.values).clamp(min=0.0)
        if not bool(want.sum() > 0):
            want.fill_(1.0)
        pick = held[torch.multinomial(want, n, replacement=True, generator=self._gen)]
        within = (torch.rand(n, generator=self._gen, dtype=torch.float64) * counts[pick]).long()
        return order[start[pick] + within]

    def filled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot indices, their stamps) of every stored sample, in :meth:`contents` order.

        A slot's stamp changes whenever a new sample is written into it, so a result computed per slot
        stays valid for the slots whose stamp has not changed."""
        if self._images is None:
            return torch.empty((0,), dtype=torch.int64), torch.empty((0,), dtype=torch.int64)
        assert self._stamps is not None
        idx = torch.cat([torch.arange(self._res_len), self._res_cap + torch.arange(self._ring_len)])
        return idx, self._stamps[idx]

    def slot_images(self, idx: torch.Tensor) -> torch.Tensor:
        """The uint8 images stored in slots ``idx``."""
        assert self._images is not None
        return self._images.index_select(0, idx)

    def slot_targets(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's top-1 classes and the labels (-1: none) stored in slots ``idx``: int64 each."""
        assert self._logits is not None and self._labels is not None
        return self._logits.index_select(0, idx).argmax(1), self._labels.index_select(0, idx)

    def contents(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every stored sample once (reservoir, then recent region): uint8 images, float32 logits, int64 labels."""
        if self._images is None:
            return (torch.empty((0, 0, 0, 0), dtype=torch.uint8), torch.empty((0, 0)),
                    torch.empty((0,), dtype=torch.int64))
        assert self._logits is not None and self._labels is not None
        idx = torch.cat([torch.arange(self._res_len), self._res_cap + torch.arange(self._ring_len)])
        return self._take(idx)

    # -- checkpoint state ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Tensors and ints only (loads with ``torch.load(weights_only=True)``); copies, safe to save on
        another thread. Holds only the filled slots."""
        state: dict = {
            "format": FORMAT, "seen": self.seen, "revision": self.revision,
            "protect_until": self._protect_until, "ring_head": self._ring_head,
            "ring_slots": self._ring_cap, "rng": self._gen.get_state(),
        }
        if self._images is not None:
            assert self._logits is not None and self._labels is not None
            res, ring = slice(0, self._res_len), slice(self._res_cap, self._res_cap + self._ring_len)
            for name, t in (("images", self._images), ("logits", self._logits), ("labels", self._labels),
                            ("priority", self._prio)):
                state[f"reservoir_{name}"] = t[res].clone()
                state[f"recent_{name}"] = t[ring].clone()
            if self.balance:
                assert self._recent is not None
                state["class_seen"] = torch.tensor(self._class_seen, dtype=torch.int64)
                state["class_full"] = torch.tensor(self._full, dtype=torch.bool)
                state["class_recent"] = self._recent.clone()
                # The order of each class's slot list decides later picks: kept for an exact resume.
                state["class_slots"] = torch.tensor([s for lst in self._slots for s in lst], dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`. With the same configuration the buffer continues exactly as the
        saved one; with a smaller one it keeps the first reservoir slots and the latest recent samples."""
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError("not a replay buffer state (missing or unknown 'format')")
        ints = {k: state.get(k) for k in ("seen", "revision", "protect_until", "ring_head", "ring_slots")}
        for k, v in ints.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"replay state: {k} is not a non-negative integer")
        rng = state.get("rng")
        if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8:
            raise ValueError("replay state: rng is not a uint8 tensor")
        self._images = self._logits = self._labels = self._prio = None
        self._res_cap = self._ring_cap = self._res_len = self._ring_len = self._ring_head = 0
        self._gen.set_state(rng)
        self.seen, self.revision, self._protect_until = ints["seen"], ints["revision"], ints["protect_until"]
        if "reservoir_images" not in state:
            return
        regions = {}
        for region in ("reservoir", "recent"):
            images, logits, labels = (state.get(f"{region}_{n}") for n in ("images", "logits", "labels"))
            if not all(isinstance(t, torch.Tensor) for t in (images, logits, labels)):
                raise ValueError(f"replay state: {region} tensors missing")
            check_batch(images, logits, labels)
            prio = state.get(f"{region}_priority")  # absent in states saved before priorities: 1 each
            if prio is not None and not (isinstance(prio, torch.Tensor) and prio.is_floating_point()
                                         and prio.shape == labels.shape):
                raise ValueError(f"replay state: {region}_priority is not one float per sample")
            regions[region] = (images, logits.to(torch.float16), labels.to(torch.int64),
                               _priorities(prio) if prio is not None else None)
        images, logits, _, _ = regions["reservoir"]
        if regions["recent"][0].shape[1:] != images.shape[1:] or regions["recent"][1].shape[1] != logits.shape[1]:
            raise ValueError("replay state: reservoir and recent samples differ in shape")
        self._allocate(tuple(images.shape[1:]), int(logits.shape[1]))

        res = regions["reservoir"]
        self._res_len = min(int(res[0].shape[0]), self._res_cap)
        self._write(torch.arange(self._res_len), torch.arange(self._res_len), *res)
        if self.balance:
            self._load_balance(state, res[1][:self._res_len].argmax(1))

        recent = regions["recent"]
        saved_len, saved_cap, head = int(recent[0].shape[0]), ints["ring_slots"], ints["ring_head"]
        if saved_cap == self._ring_cap and saved_len <= saved_cap and (head == saved_len % max(saved_cap, 1)
                                                                       or saved_len == saved_cap):
            # Same layout: slot for slot, so later draws pick the same samples.
            self._ring_len, self._ring_head = saved_len, head % max(saved_cap, 1)
            self._write(self._res_cap + torch.arange(saved_len), torch.arange(saved_len), *recent)
        else:
            # Different layout: oldest-to-newest order, keep the newest that fit.
            order = torch.arange(saved_len)
            if saved_len == saved_cap and saved_cap:
                order = (head + order) % saved_cap
            m = min(saved_len, self._ring_cap)
            keep = order[saved_len - m:]
            self._write(self._res_cap + torch.arange(m), keep, *recent)
            self._ring_len, self._ring_head = m, m % max(self._ring_cap, 1)

    def _load_balance(self, state: dict, classes: torch.Tensor) -> None:
        """Rebuild the per-class bookkeeping from the stored samples' classes; the saved counts and
        frequencies when the state has them (from a balanced buffer), else estimates from the reservoir."""
        assert self._recent is not None
        k = self._recent.numel()
        n = classes.numel()
        self._index = None
        order = state.get("class_slots")
        if not (isinstance(order, torch.Tensor) and order.dtype == torch.int64 and order.shape == (n,)
                and torch.equal(order.sort().values, torch.arange(n))):
            order = torch.arange(n)  # a different layout (or a plain buffer's state): slot order
        cls = classes.tolist()
        for slot in order.tolist():
            self._place(slot, cls[slot])
        stored = [len(lst) for lst in self._slots]
        seen, full, recent = (state.get(n) for n in ("class_seen", "class_full", "class_recent"))
        if isinstance(seen, torch.Tensor) and isinstance(full, torch.Tensor) and isinstance(recent, torch.Tensor):
            if seen.shape != (k,) or full.shape != (k,) or recent.shape != (k,):
                raise ValueError(f"replay state: class statistics are not of {k} classes")
            if not bool(torch.isfinite(recent).all()):
                raise ValueError("replay state: class_recent is not finite")
            # At least the stored count: the within-class replacement probability stays at most 1.
            self._class_seen = [max(int(a), b) for a, b in zip(seen.tolist(), stored, strict=True)]
            self._full = [bool(f) for f in full.tolist()]
            self._recent = recent.to(torch.float64).clone()
        else:  # the reservoir is a uniform sample of the stream: scale its class counts up
            scale = self.seen / max(1, classes.numel())
            self._class_seen = [max(round(m * scale), m) for m in stored]
            top = max(stored)
            self._full = [m == top and m > 0 for m in stored]
