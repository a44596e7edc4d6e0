"""Hinton knowledge-distillation loss with an optional, masked hard-label term.

Pure: tensors in, tensors out. No host sync (no ``.item()``, no Python
branching on tensor values), so the daemon can call it every step without
stalling the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FORMS = ("kl", "soft_ce")


@dataclass(frozen=True)
class KDLoss:
    """One step's loss and its parts, on the logits' device: 0-dim tensors, and one per-sample vector."""

    total: torch.Tensor  # float32, what backward() is called on
    kd: torch.Tensor  # float32, T² · mean over all N samples of the soft-target term (before alpha)
    ce: torch.Tensor  # float32, mean CE over the labelled samples (0 when none)
    labelled: torch.Tensor  # int64, number of labelled samples
    divergence: torch.Tensor  # float32 N, detached: KL(P_T ‖ P_S) per sample at temperature T (no T² factor)


def _check(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float,
           alpha: float, form: str, weight: torch.Tensor | None) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if form not in FORMS:
        raise ValueError(f"Invalid form {form!r}. Valid: {', '.join(FORMS)}")
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student and teacher logits must both be N×K, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if student_logits.shape[0] == 0:
        raise ValueError("empty batch: kd_loss needs at least one sample")
    if labels.shape != student_logits.shape[:1]:
        raise ValueError(f"labels must be shape ({student_logits.shape[0]},), got {tuple(labels.shape)}")
    if weight is not None and (weight.shape != student_logits.shape[:1] or not weight.is_floating_point()):
        raise ValueError(f"weight must be float ({student_logits.shape[0]},), got {weight.dtype} {tuple(weight.shape)}")


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    form: str = "kl",
    weight: torch.Tensor | None = None,
) -> KDLoss:
    """Hinton KD loss for a batch where only some samples carry a label.

    Args:
        student_logits: float N×K (any float dtype; computed in float32).
        teacher_logits: float N×K; detached here, the teacher never gets a gradient.
        labels: int64 N, class id in [0, K) or -1 for "no label". Ids are not
            range-checked here (that would sync the host); the decoder rejects
            bad labels before they reach a batch.
        temperature: T > 0, softens both distributions.
        alpha: weight of the KD term on a *labelled* sample, 0 <= alpha <= 1.
        form: "kl" -> KL(P_T ‖ P_S); "soft_ce" -> H(P_T, P_S) = KL + H(P_T).
            Same gradient w.r.t. the student; "kl" is 0 when the student
            matches the teacher, which makes it the readable metric.
        weight: optional float N, w_i on each sample's loss in ``total`` (1
            when None); the reported ``kd``, ``ce`` and ``divergence`` stay
            unweighted.

    The rule, per sample i (m_i = 1 if labelled, else 0):

        kd_i   = T² · KL(softmax(t_i/T) ‖ softmax(s_i/T))      (or T² · H for soft_ce)
        ce_i   = CE(s_i, y_i) at T = 1
        loss_i = (1 − (1 − alpha)·m_i) · kd_i + (1 − alpha)·m_i · ce_i
        total  = (1/N) · Σ_i w_i · loss_i

    A labelled sample gets the classic Hinton mix alpha·kd + (1 − alpha)·ce;
    an unlabelled sample gets the KD term alone at full strength. So a fully
    labelled batch gives alpha·kd + (1 − alpha)·ce, an unlabelled stream
    (the common case) gives total = kd, and a mixed batch interpolates by
    the labelled fraction. A sample's loss never depends on what else is in
    its batch. The T² factor keeps the soft-target gradient magnitude roughly
    independent of T (Hinton et al. 2015, §2).

    Reported parts: ``kd`` is T² · batch mean (KL summed over classes, averaged
    over samples, i.e. ``F.kl_div(..., reduction="batchmean")`` — not
    ``nn.KLDivLoss()``'s default "mean", which also divides by K); ``ce`` is
    the mean over labelled samples, 0 when there are none.
    """
    _check(student_logits, teacher_logits, labels, temperature, alpha, form, weight)
    s = student_logits.float()
    t = teacher_logits.detach().float()
    n = s.shape[0]
    t2 = temperature * temperature

    log_p_s = F.log_softmax(s / temperature, dim=1)
    log_p_t = F.log_softmax(t / temperature, dim=1)
    p_t = log_p_t.exp()
    if form == "kl":
        per_kd = (p_t * (log_p_t - log_p_s)).sum(dim=1)  # N, KL(P_T ‖ P_S) >= 0
        divergence = per_kd.detach()
    else:
        per_kd = -(p_t * log_p_s).sum(dim=1)  # N, H(P_T, P_S)
        divergence = per_kd.detach() + (p_t * log_p_t).sum(dim=1)  # H(P_T, P_S) − H(P_T)
    per_kd = t2 * per_kd

    mask = labels >= 0
    m = mask.float()
    labelled = mask.sum()
    # Unlabelled rows get a dummy class 0 and are zeroed by the mask, which
    # avoids boolean indexing (a data-dependent shape means a host sync).
    per_ce = F.cross_entropy(s, labels.clamp(min=0), reduction="none") * m
    ce = per_ce.sum() / labelled.clamp(min=1).float()

    weight_kd = 1.0 - (1.0 - alpha) * m
    per_loss = weight_kd * per_kd + (1.0 - alpha) * per_ce
    if weight is not None:
        per_loss = per_loss * weight.to(per_loss.dtype)
    total = per_loss.sum() / n
    kd = per_kd.sum() / n
    return KDLoss(total=total, kd=kd, ce=ce, labelled=labelled, divergence=divergence)
