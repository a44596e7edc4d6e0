import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from streamkd.learn.loss import kd_loss

# The 2×3 example, worked by hand at T = 2:
#   row 0: s = [1, 2, 3], t = [3, 2, 1]; row 1: s = t = [0, 0, 0]
#   softmax(t0/2) = softmax([1.5, 1, 0.5]) = [1, e^-.5, e^-1] / 1.974412
#                 = [0.506480, 0.307196, 0.186324]
#   log P_T - log P_S for row 0 = [+1, 0, -1] (the scaled logits are mirror images)
#   KL_0 = 0.506480 - 0.186324 = 0.320157; KL_1 = 0
#   kd = T² · (KL_0 + KL_1) / 2 = 4 · 0.160078 = 0.640313
#   ce_0 = -log_softmax([1, 2, 3])[0] = log(e + e² + e³) - 1 = 2.407606 (T = 1)
#   label row 0 = 0, row 1 unlabelled, alpha = 0.5:
#   total = (0.5 · 4 · 0.320157 + 0.5 · 2.407606 + 1 · 0) / 2 = 0.922058
#   soft_ce adds T² · H(P_T): H_0 = 1.020191, H_1 = ln 3 = 1.098612
#   kd_soft = 4 · ((0.320157 + 1.020191) + (0 + 1.098612)) / 2 = 4.877921
#   total_soft = (0.5 · 4 · 1.340348 + 0.5 · 2.407606 + 4 · 1.098612) / 2 = 4.139474
S = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
T_ = torch.tensor([[3.0, 2.0, 1.0], [0.0, 0.0, 0.0]])
Y = torch.tensor([0, -1])


def test_hand_computed_kl():
    r = kd_loss(S, T_, Y, temperature=2.0, alpha=0.5)
    assert r.kd.item() == pytest.approx(0.640313, abs=1e-5)
    assert r.ce.item() == pytest.approx(2.407606, abs=1e-5)
    assert r.total.item() == pytest.approx(0.922058, abs=1e-5)
    assert r.labelled.item() == 1 and r.labelled.dtype == torch.int64


def test_hand_computed_soft_ce():
    r = kd_loss(S, T_, Y, temperature=2.0, alpha=0.5, form="soft_ce")
    assert r.kd.item() == pytest.approx(4.877921, abs=1e-5)
    assert r.total.item() == pytest.approx(4.139474, abs=1e-5)


def test_matches_torch_batchmean_kl():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    temp = 3.0
    ref = F.kl_div(F.log_softmax(s / temp, 1), F.log_softmax(t / temp, 1), reduction="batchmean", log_target=True)
    r = kd_loss(s, t, torch.full((8,), -1), temperature=temp, alpha=0.3)
    assert r.kd.item() == pytest.approx(temp**2 * ref.item(), rel=1e-5)


def test_seed_bug_kldivloss_default_mean_is_k_times_smaller():
    # nn.KLDivLoss() defaults to reduction="mean": it averages over N·K
    # elements instead of summing classes and averaging samples, so the KD
    # term silently shrinks by a factor K (here 10).
    g = torch.Generator().manual_seed(1)
    k = 10
    s, t = torch.randn(4, k, generator=g), torch.randn(4, k, generator=g)
    temp = 4.0
    with pytest.warns(UserWarning, match="batchmean"):  # torch itself flags it
        buggy = temp**2 * nn.KLDivLoss()(F.log_softmax(s / temp, 1), F.softmax(t / temp, 1))
    ours = kd_loss(s, t, torch.full((4,), -1), temperature=temp, alpha=1.0).kd
    assert ours.item() == pytest.approx(k * buggy.item(), rel=1e-5)
    assert ours.item() > 5 * buggy.item()


def _student_grad(s, t, labels, temp, alpha=1.0, form="kl"):
    s = s.clone().requires_grad_(True)
    kd_loss(s, t, labels, temperature=temp, alpha=alpha, form=form).total.backward()
    return s.grad


def test_t_squared_keeps_gradient_magnitude_for_large_t():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(16, 10, generator=g), torch.randn(16, 10, generator=g)
    none = torch.full((16,), -1)
    norms = [_student_grad(s, t, none, temp).norm().item() for temp in (10.0, 20.0, 40.0)]
    assert norms[1] == pytest.approx(norms[0], rel=0.05)
    assert norms[2] == pytest.approx(norms[0], rel=0.05)
    # without the T² factor the gradient would have shrunk 16× from T=10 to T=40
    assert norms[2] > 0.5 * norms[0]


def test_kl_and_soft_ce_same_gradient_differ_by_teacher_entropy():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    labels = torch.tensor([1, -1, 3, -1, -1, 0])
    temp = 2.5
    g_kl = _student_grad(s, t, labels, temp, alpha=0.7, form="kl")
    g_ce = _student_grad(s, t, labels, temp, alpha=0.7, form="soft_ce")
    torch.testing.assert_close(g_kl, g_ce)
    p_t = F.softmax(t / temp, 1)
    h = -(p_t * p_t.log()).sum(1).mean()
    kl = kd_loss(s, t, labels, temp, 0.7, "kl").kd
    sce = kd_loss(s, t, labels, temp, 0.7, "soft_ce").kd
    assert (sce - kl).item() == pytest.approx(temp**2 * h.item(), rel=1e-5)


def test_label_mask_rules():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    alpha = 0.25
    # no labels: the KD term alone at full strength, ce reported as 0
    r = kd_loss(s, t, torch.full((4,), -1), 2.0, alpha)
    assert r.total.item() == pytest.approx(r.kd.item(), rel=1e-6)
    assert r.ce.item() == 0.0 and r.labelled.item() == 0
    # all labelled: the classic alpha·kd + (1 − alpha)·ce
    y = torch.tensor([0, 1, 2, 1])
    r = kd_loss(s, t, y, 2.0, alpha)
    assert r.ce.item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)
    assert r.total.item() == pytest.approx(alpha * r.kd.item() + (1 - alpha) * r.ce.item(), rel=1e-6)
    # mixed: ce averages only the labelled rows; the label of an unlabelled
    # row cannot leak in (changing -1 rows' content changes nothing in ce)
    y = torch.tensor([2, -1, 0, -1])
    r = kd_loss(s, t, y, 2.0, alpha)
    assert r.labelled.item() == 2
    assert r.ce.item() == pytest.approx(F.cross_entropy(s[[0, 2]], y[[0, 2]]).item(), rel=1e-6)
    per_kd = 4.0 * F.kl_div(F.log_softmax(s / 2, 1), F.log_softmax(t / 2, 1), reduction="none", log_target=True).sum(1)
    per_ce = F.cross_entropy(s, y.clamp(min=0), reduction="none")
    expected = (alpha * per_kd[0] + (1 - alpha) * per_ce[0] + per_kd[1]
                + alpha * per_kd[2] + (1 - alpha) * per_ce[2] + per_kd[3]) / 4
    assert r.total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_teacher_gets_no_gradient_and_bf16_computes_in_float32():
    s = torch.randn(3, 5).bfloat16().requires_grad_(True)
    t = torch.randn(3, 5).bfloat16().requires_grad_(True)
    r = kd_loss(s, t, torch.tensor([1, -1, 4]), 3.0, 0.5)
    assert r.total.dtype == torch.float32 and r.kd.dtype == torch.float32
    r.total.backward()
    assert s.grad is not None and s.grad.dtype == torch.bfloat16
    assert t.grad is None


def test_zero_when_student_equals_teacher():
    s = torch.randn(5, 7)
    r = kd_loss(s, s.clone(), torch.full((5,), -1), 4.0, 0.5)
    assert r.total.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": -0.1}, "alpha"),
        ({"form": "mse"}, "Valid: kl, soft_ce"),
    ],
)
def test_validation(kwargs, match):
    args = {"temperature": 2.0, "alpha": 0.5, "form": "kl"} | kwargs
    with pytest.raises(ValueError, match=match):
        kd_loss(S, T_, Y, **args)


def test_shape_validation():
    with pytest.raises(ValueError, match="N×K"):
        kd_loss(S, T_[:, :2], Y, 2.0, 0.5)
    with pytest.raises(ValueError, match="labels"):
        kd_loss(S, T_, torch.tensor([0]), 2.0, 0.5)
    with pytest.raises(ValueError, match="empty"):
        kd_loss(S[:0], T_[:0], Y[:0], 2.0, 0.5)


@pytest.mark.parametrize("form", ["kl", "soft_ce"])
def test_divergence_is_each_samples_kl_at_the_temperature(form):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g, requires_grad=True), torch.randn(6, 5, generator=g) * 3
    out = kd_loss(s, t, torch.full((6,), -1), temperature=2.0, alpha=0.9, form=form)
    want = F.kl_div(F.log_softmax(s / 2, 1), F.log_softmax(t / 2, 1), log_target=True, reduction="none").sum(1)
    assert out.divergence.shape == (6,) and not out.divergence.requires_grad
    torch.testing.assert_close(out.divergence, want.detach())


def test_a_weight_scales_each_samples_share_of_the_total_and_nothing_else():
    """The hand-worked example with weights 3 and 0.5: total = (3 · loss_0 + 0.5 · loss_1) / 2, where loss_1 is
    row 1's KD term at full strength (unlabelled: T² · H_1 under soft_ce); kd, ce and divergence unweighted."""
    w = torch.tensor([3.0, 0.5])
    plain, weighted = kd_loss(S, T_, Y, 2.0, 0.5), kd_loss(S, T_, Y, 2.0, 0.5, weight=w)
    torch.testing.assert_close(weighted.total, torch.tensor(3 * 0.922058 * 2 / 2), atol=1e-5, rtol=0)
    soft = kd_loss(S, T_, Y, 2.0, 0.5, form="soft_ce", weight=w)
    want = (3 * (0.5 * 4 * 1.340348 + 0.5 * 2.407606) + 0.5 * 4 * 1.098612) / 2
    torch.testing.assert_close(soft.total, torch.tensor(want), atol=1e-5, rtol=0)
    for name in ("kd", "ce", "divergence"):
        torch.testing.assert_close(getattr(weighted, name), getattr(plain, name))
    ones = kd_loss(S, T_, Y, 2.0, 0.5, weight=torch.ones(2))
    torch.testing.assert_close(ones.total, plain.total)


def test_weight_validation():
    with pytest.raises(ValueError, match="weight"):
        kd_loss(S, T_, Y, 2.0, 0.5, weight=torch.ones(3))
    with pytest.raises(ValueError, match="weight"):
        kd_loss(S, T_, Y, 2.0, 0.5, weight=torch.ones(2, dtype=torch.int64))
