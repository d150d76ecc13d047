"""Losses against hand-computed values and torchvision."""

import math
import shutil

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss as tv_focal

from segany.training import losses
from segany.training.losses import SamLoss, dice_loss, mask_iou, sigmoid_focal_loss


def test_focal_matches_hand_computation():
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 3.0]]]])  # (1, 1, 2, 2)
    t = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    vals = []
    for x, y in zip(logits.flatten().tolist(), t.flatten().tolist()):
        p = 1 / (1 + math.exp(-x))
        pt = p if y else 1 - p
        a = 0.25 if y else 0.75
        vals.append(-a * (1 - pt) ** 2 * math.log(pt))
    assert torch.allclose(sigmoid_focal_loss(logits, t), torch.tensor([[sum(vals) / 4]]), atol=1e-6)


def test_focal_is_a_per_mask_mean_over_pixels():
    # alpha < 0 and gamma 0 reduce focal to plain BCE: the loss must be its mean over (H, W)
    # of each mask, not a sum or a mean over the whole batch
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2, 16, 16, generator=g) * 3
    t = (torch.rand(3, 2, 16, 16, generator=g) > 0.5).float()
    p = logits.double().sigmoid()
    bce = -(t * p.log() + (1 - t) * (1 - p).log())
    assert torch.allclose(sigmoid_focal_loss(logits, t, alpha=-1, gamma=0).double(), bce.mean((-2, -1)), atol=1e-6)


def test_dice_matches_hand_computation():
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 3.0]]]])
    t = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    p = torch.sigmoid(logits).flatten()
    inter = p[0] + p[3]
    expected = 1 - (2 * inter + 1) / (p.sum() + 2 + 1)
    assert torch.allclose(dice_loss(logits, t), expected.view(1, 1), atol=1e-6)


def test_mask_iou():
    logits = torch.tensor([[[[1.0, 1.0], [-1.0, -1.0]]]])
    t = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    assert torch.allclose(mask_iou(logits, t), torch.tensor([[1 / 3]]))
    assert mask_iou(-torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)).item() == 1.0


def test_sam_loss_total_is_20_focal_plus_dice_plus_iou_mse():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 1, 8, 8, generator=g)
    iou_pred = torch.rand(2, 1, generator=g)
    target = torch.rand(2, 8, 8, generator=g) > 0.5
    out = SamLoss()(logits, iou_pred, target, torch.tensor([True, True]))
    t = target[:, None].float()
    true_iou = mask_iou(logits, t)
    expected = (
        20 * tv_focal(logits, t, reduction="none").mean((-2, -1)) + dice_loss(logits, t) + (iou_pred - true_iou) ** 2
    )[:, 0]
    assert torch.allclose(out["loss"], expected, atol=1e-5)


def test_multimask_backprops_only_the_lowest_loss_mask():
    target = torch.zeros(4, 8, 8, dtype=torch.bool)
    target[:, 2:6, 2:6] = True
    good = torch.where(target, 5.0, -5.0)  # (4, 8, 8) near-perfect
    logits = torch.randn(4, 3, 8, 8)
    best = torch.tensor([0, 2, 1, 2])
    logits[torch.arange(4), best] = good
    logits.requires_grad_(True)
    iou_pred = torch.rand(4, 3, requires_grad=True)
    out = SamLoss(supervise_all_iou=False)(logits, iou_pred, target, torch.ones(4, dtype=torch.bool))
    assert torch.equal(out["best"], best)
    out["loss"].sum().backward()
    has_grad = logits.grad.flatten(2).abs().sum(-1) > 0  # (4, 3)
    assert torch.equal(has_grad.sum(1), torch.ones(4, dtype=torch.long))
    assert has_grad[torch.arange(4), best].all()
    # IoU head with supervise_all_iou=False (SAM 2's default): only the backpropagated mask's prediction
    assert torch.equal(iou_pred.grad != 0, has_grad)


def test_supervise_all_iou():
    logits = torch.randn(2, 3, 8, 8)
    iou_pred = torch.rand(2, 3, requires_grad=True)
    target = torch.rand(2, 8, 8) > 0.5
    out = SamLoss(supervise_all_iou=True)(logits, iou_pred, target, torch.ones(2, dtype=torch.bool))
    out["loss"].sum().backward()
    assert (iou_pred.grad != 0).all()


def test_iou_target_of_empty_prediction_and_empty_gt():
    logits = -torch.ones(1, 1, 8, 8)  # empty prediction
    target = torch.zeros(1, 8, 8, dtype=torch.bool)  # empty GT
    iou_pred = torch.full((1, 1), 0.25)
    ones = torch.ones(1, dtype=torch.bool)
    assert SamLoss(iou_weight=1.0)(logits, iou_pred, target, ones)["iou"].item() == pytest.approx(0.25**2)  # target 0
    old = SamLoss(iou_weight=1.0, empty_iou=1.0)(logits, iou_pred, target, ones)["iou"].item()
    assert old == pytest.approx(0.75**2)


def test_padding_region_counts_in_no_term():
    g = torch.Generator().manual_seed(0)
    R, K, H = 3, 3, 16
    inside = torch.zeros(R, H, H, dtype=torch.bool)
    inside[:, :10, :12] = True  # content 10 x 12; the rest is zero padding
    target = torch.zeros(R, H, H, dtype=torch.bool)
    target[:, 2:6, 3:9] = True
    logits = torch.randn(R, K, H, H, generator=g)
    iou_pred = torch.rand(R, K, generator=g)
    valid = torch.ones(R, dtype=torch.bool)
    loss = SamLoss(supervise_all_iou=True)
    a = loss(logits, iou_pred, target, valid, inside)
    # anything in the padding (here: confident foreground) changes nothing
    b = loss(torch.where(inside[:, None], logits, 9.0), iou_pred, target, valid, inside)
    for k in ("loss", "focal", "dice", "iou", "true_iou"):
        assert torch.allclose(a[k], b[k]), k
    # and equals the loss of the cropped image computed without a region (hand truth)
    c = loss(logits[..., :10, :12], iou_pred, target[:, :10, :12], valid)
    for k in ("loss", "focal", "dice", "iou", "true_iou"):
        assert torch.allclose(a[k], c[k], atol=1e-6), k
    x = logits.clone().requires_grad_(True)
    loss(x, iou_pred, target, valid, inside)["loss"].sum().backward()
    assert (x.grad[~inside[:, None].expand_as(x)] == 0).all()


def test_invalid_rows_give_zero_loss_and_zero_gradient():
    logits = torch.randn(3, 3, 8, 8, requires_grad=True)
    iou_pred = torch.rand(3, 3, requires_grad=True)
    target = torch.zeros(3, 8, 8, dtype=torch.bool)  # padding rows have empty targets
    target[0, :4] = True
    valid = torch.tensor([True, False, False])
    out = SamLoss()(logits, iou_pred, target, valid)
    assert (out["loss"][1:] == 0).all() and out["loss"][0] > 0
    out["loss"].sum().backward()
    assert (logits.grad[1:] == 0).all() and (iou_pred.grad[1:] == 0).all()
    assert logits.grad[0].abs().sum() > 0


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("with_inside", [False, True])
def test_mask_terms_value_and_gradient_match_autograd_of_torchvision(compiled, with_inside):
    """The focal + dice terms, eager and through torch.compile (SamLoss(compile=True)): values
    and gradient w.r.t. the logits against autograd through torchvision's focal loss and a
    plain dice in float64, with padding pixels counting in no term."""

    if compiled and shutil.which("g++") is None and shutil.which("cc") is None:
        pytest.skip("torch.compile's CPU backend needs a C++ compiler")
    g = torch.Generator().manual_seed(3)
    R, K, H, W = 3, 3, 13, 17
    x = (torch.randn(R, K, H, W, generator=g, dtype=torch.float64) * 4).float()
    t = torch.rand(R, 1, H, W, generator=g) > 0.6
    inside = torch.ones(R, 1, H, W, dtype=torch.bool)
    if with_inside:
        inside[0, :, 9:] = False  # padding below
        inside[1, :, :, 11:] = False  # padding right
    t = t & inside
    gf, gd = torch.randn(R, K, generator=g), torch.randn(R, K, generator=g)  # upstream gradients

    ours_x = x.clone().requires_grad_()
    fn = losses.compiled_mask_terms if compiled else losses.mask_terms
    terms = fn(ours_x, t, inside=inside if with_inside else None)
    (terms["focal"] * gf + terms["dice"] * gd).sum().backward()

    ref_x = x.double().clone().requires_grad_()
    tf, ins = t.double().expand(R, K, H, W), inside.double().expand(R, K, H, W)
    focal = (tv_focal(ref_x, tf, reduction="none") * ins).sum((-2, -1)) / ins.sum((-2, -1))
    p = ref_x.sigmoid() * ins
    dice = 1 - (2 * (p * tf).sum((-2, -1)) + 1) / (p.sum((-2, -1)) + tf.sum((-2, -1)) + 1)
    (focal * gf + dice * gd).sum().backward()

    assert torch.allclose(terms["focal"].double(), focal, rtol=1e-5, atol=1e-7)
    assert torch.allclose(terms["dice"].double(), dice, rtol=1e-5, atol=1e-7)
    assert torch.allclose(ours_x.grad.double(), ref_x.grad, rtol=1e-4, atol=1e-8)
    pred = (x > 0) & inside
    assert torch.equal(terms["inter"], (pred & t).sum((-2, -1)).float())
    assert torch.equal(terms["union"], (pred | t).sum((-2, -1)).float())


def test_compiled_terms_without_a_compiler_say_so(monkeypatch):
    """loss.compile=true on a CPU with no C++ compiler: an error naming the key, before inductor fails."""
    monkeypatch.setattr(losses, "_compiled_mask_terms", None)
    monkeypatch.setattr(losses.shutil, "which", lambda name: None)
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(RuntimeError, match="loss.compile=false"):
        losses.compiled_mask_terms(x, x)
