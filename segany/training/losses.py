"""SAM's mask losses (appendix A): focal (alpha 0.25, gamma 2) : dice = 20 : 1 per
predicted mask, backpropagated only through the lowest-loss mask of a multimask output,
plus the IoU head's MSE (weight 1; ``iou_loss="l1"`` for the ablation) against the actual IoU
of the backpropagated mask (``supervise_all_iou``: of every candidate, SAM 2.1's fine-tuning).

Pixels outside ``inside`` (the zero padding below / right of the image) count in no term:
focal is the mean over the image's pixels, dice and IoU are computed on them only.

Shapes: R rows (masks of all images), K candidate masks per row (3 multimask, 1 single),
H x W the loss resolution. Per-row losses come out un-reduced over rows; the caller sums
over rows and rounds and divides by the number of valid masks (across ranks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torchvision
from torch import Tensor

from segany.evaluation.metrics import mask_iou


def sigmoid_focal_loss(
    logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0, inside: Optional[Tensor] = None
) -> Tensor:
    """(R, K, H, W) logits, targets (same shape, float) -> (R, K) focal loss, mean over pixels
    (SAM normalises per mask; torchvision's reductions are over all elements, hence "none").
    inside (R, 1, H, W) bool: the mean is over these pixels only."""
    f = torchvision.ops.sigmoid_focal_loss(logits, targets, alpha, gamma, reduction="none")
    if inside is None:
        return f.mean(dim=(-2, -1))
    w = inside.to(f.dtype)
    return (f * w).sum(dim=(-2, -1)) / w.sum(dim=(-2, -1)).clamp(min=1)


def dice_loss(logits: Tensor, targets: Tensor, smooth: float = 1.0, inside: Optional[Tensor] = None) -> Tensor:
    """(R, K, H, W) -> (R, K): 1 - (2 |p t| + s) / (|p| + |t| + s) on sigmoid probabilities
    (over the ``inside`` pixels (R, 1, H, W) only, when given)."""
    p = logits.sigmoid()
    if inside is not None:
        p = p * inside.to(p.dtype)
    p, t = p.flatten(-2), targets.flatten(-2)
    return 1 - (2 * (p * t).sum(-1) + smooth) / (p.sum(-1) + t.sum(-1) + smooth)


def iou_mse(iou_pred: Tensor, iou_true: Tensor) -> Tensor:
    """(R, K), (R, K) -> (R, K) squared error."""
    return (iou_pred - iou_true) ** 2


def iou_l1(iou_pred: Tensor, iou_true: Tensor) -> Tensor:
    """(R, K), (R, K) -> (R, K) absolute error."""
    return (iou_pred - iou_true).abs()


IOU_LOSSES = {"mse": iou_mse, "l1": iou_l1}


@dataclass
class SamLoss:
    """weights and options of the per-round loss (config node ``loss``)."""

    focal_weight: float = 20.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    supervise_all_iou: bool = True  # IoU MSE on every candidate (ranks the 3 masks) or the backpropagated one (SAM 2)
    iou_loss: str = "mse"  # IoU head regression loss: "mse" (paper) or "l1"
    empty_iou: float = 0.0  # IoU target when prediction and GT are both empty (SAM 2: 0)

    def __post_init__(self):
        for key in ("focal_weight", "dice_weight", "iou_weight"):
            if not float(getattr(self, key)) >= 0:
                raise ValueError(f"loss.{key}={getattr(self, key)!r}: must be >= 0")
        if self.focal_weight == 0 and self.dice_weight == 0:
            raise ValueError("loss.focal_weight and loss.dice_weight are both 0: no mask loss")
        if self.iou_loss not in IOU_LOSSES:
            raise ValueError(f"loss.iou_loss={self.iou_loss!r}: expected one of {sorted(IOU_LOSSES)}")

    def __call__(
        self, logits: Tensor, iou_pred: Tensor, target: Tensor, valid: Tensor, inside: Optional[Tensor] = None
    ) -> dict:
        """logits (R, K, H, W), iou_pred (R, K), target (R, H, W) bool, valid (R,) bool, inside
        (R, H, W) bool the pixels that count (None: all).

        Returns a dict of (R,) tensors: ``loss`` (total, zero for invalid rows, with zero
        gradient), ``focal``, ``dice``, ``iou`` (the chosen mask's components), ``best``
        (index of the backpropagated candidate) and ``true_iou`` (actual IoU of the chosen).
        """
        logits, iou_pred = logits.float(), iou_pred.float()  # losses in fp32 under autocast
        t = target[:, None].to(logits.dtype).expand_as(logits)  # (R, K, H, W)
        ins = None if inside is None else inside[:, None]  # (R, 1, H, W)
        focal = sigmoid_focal_loss(logits, t, self.focal_alpha, self.focal_gamma, ins)  # (R, K)
        dice = dice_loss(logits, t, inside=ins)  # (R, K)
        scored = logits if ins is None else logits.detach().masked_fill(~ins, -1.0)
        true_iou = mask_iou(scored, t, empty=self.empty_iou)  # (R, K)
        iou_err = IOU_LOSSES[self.iou_loss](iou_pred, true_iou.to(iou_pred.dtype))  # (R, K)

        combo = self.focal_weight * focal + self.dice_weight * dice  # (R, K)
        best = combo.detach().argmin(dim=1, keepdim=True)  # (R, 1)
        pick = lambda x: x.gather(1, best).squeeze(1)  # (R, K) -> (R,)
        iou_term = iou_err.mean(dim=1) if self.supervise_all_iou else pick(iou_err)
        total = pick(combo) + self.iou_weight * iou_term
        zero = torch.zeros((), device=total.device, dtype=total.dtype)
        return {
            "loss": torch.where(valid, total, zero),
            "focal": pick(focal).detach(),
            "dice": pick(dice).detach(),
            "iou": iou_term.detach(),
            "best": best.squeeze(1),
            "true_iou": pick(true_iou),
        }
