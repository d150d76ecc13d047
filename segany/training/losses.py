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

import os
import shutil
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from segany.evaluation.metrics import iou_from_counts, mask_iou  # noqa: F401  (re-exported)


def mask_terms(
    logits: Tensor,
    targets: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    smooth: float = 1.0,
    inside: Optional[Tensor] = None,
) -> dict:
    """(R, K, H, W) logits, binary targets (R, 1 | K, H, W) (bool or 0/1 float), inside (R, 1, H, W)
    bool (None: every pixel) -> dict of (R, K): ``focal`` (sigmoid focal loss, alpha / gamma as
    torchvision's, mean over the inside pixels; alpha < 0: no weighting), ``dice`` (1 - (2|pt| + s)
    / (|p| + |t| + s), p and pt on the inside pixels, |t| the whole target) and ``inter`` /
    ``union`` pixel counts of (logits > 0) inside with the target (the IoU; no gradient).

    Plain torch ops with autograd's backward; ``SamLoss(compile=True)`` (``loss.compile=true``)
    runs them through ``torch.compile``, which fuses them into a few passes that keep nothing
    from forward to backward beyond the inputs. A hand-written fused pass with a closed-form
    backward was measured against both and removed (it is kept as the baseline in
    ``benchmarks/loss_compile.py``). Forward + backward, median ms per call over 7 alternating
    rounds, AMD EPYC, 1 | 2 threads (``OMP_NUM_THREADS=1 python benchmarks/loss_compile.py``,
    then ``OMP_NUM_THREADS=2``); MB kept from forward to backward:

        logits R x K x S^2         plain          compiled      fused (removed)    MB plain / compiled / fused
        24 x 3 x 192^2 (demo)      444 | 433      338 | 152     416 | 388          68 / 0 / 14
        24 x 1 x 192^2 (demo)      100 | 174      102 |  51     143 | 137          27 / 0 / 14
        64 x 3 x 256^2            5024 | 2447    1341 | 669    2086 | 2263        320 / 0 / 64

    The compiled plain terms are 0.6-0.8x (1 thread) and 0.3-0.4x (2 threads) of the fused pass.
    """
    x = logits.float()
    t = (targets.to(x.dtype) > 0.5).to(x.dtype).expand_as(x)
    ins = torch.ones_like(x[:, :1]) if inside is None else inside.to(x.dtype)
    p = torch.sigmoid(x)
    ce = torch.nn.functional.binary_cross_entropy_with_logits(x, t, reduction="none")
    f = ce * (1 - (p * t + (1 - p) * (1 - t))) ** gamma  # torchvision's sigmoid_focal_loss
    if alpha >= 0:
        f = f * (alpha * t + (1 - alpha) * (1 - t))
    hw = (-2, -1)
    focal = (f * ins).sum(hw) / ins.sum(hw).clamp(min=1)
    dice = 1 - (2 * (p * t * ins).sum(hw) + smooth) / ((p * ins).sum(hw) + t.sum(hw) + smooth)
    with torch.no_grad():
        pred = (x > 0).to(x.dtype) * ins
        inter = (pred * t).sum(hw)
        union = pred.sum(hw) + t.sum(hw) - inter
    return {"focal": focal, "dice": dice, "inter": inter, "union": union}


_compiled_mask_terms = None


def compiled_mask_terms(*args, **kwargs) -> dict:
    """mask_terms under torch.compile (compiled on the first call; the CPU backend needs a C++ compiler)."""
    global _compiled_mask_terms
    if _compiled_mask_terms is None:
        logits = args[0] if args else kwargs["logits"]
        if logits.device.type == "cpu" and not any(map(shutil.which, (os.environ.get("CXX", "c++"), "g++", "clang++"))):
            raise RuntimeError(
                "loss.compile=true on the CPU needs a C++ compiler for torch.compile (none of $CXX, c++, g++, "
                "clang++ on PATH): install one or set loss.compile=false"
            )
        _compiled_mask_terms = torch.compile(mask_terms)
    return _compiled_mask_terms(*args, **kwargs)


def sigmoid_focal_loss(
    logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0, inside: Optional[Tensor] = None
) -> Tensor:
    """(R, K, H, W) logits, binary targets (same shape or (R, 1, H, W)) -> (R, K) focal loss,
    torchvision's per pixel, mean over the pixels of each mask (SAM normalises per mask).
    inside (R, 1, H, W) bool: the mean is over these pixels only."""
    return mask_terms(logits, targets, alpha, gamma, inside=inside)["focal"]


def dice_loss(logits: Tensor, targets: Tensor, smooth: float = 1.0, inside: Optional[Tensor] = None) -> Tensor:
    """(R, K, H, W) -> (R, K): 1 - (2 |p t| + s) / (|p| + |t| + s) on sigmoid probabilities
    (over the ``inside`` pixels (R, 1, H, W) only, when given); binary targets."""
    return mask_terms(logits, targets, smooth=smooth, inside=inside)["dice"]


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
    compile: bool = False  # the pixel terms through torch.compile (mask_terms: the measured figures)

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
        ins = None if inside is None else inside[:, None]  # (R, 1, H, W)
        terms = compiled_mask_terms if self.compile else mask_terms
        m = terms(logits, target[:, None], self.focal_alpha, self.focal_gamma, inside=ins)
        focal, dice = m["focal"], m["dice"]  # (R, K)
        true_iou = iou_from_counts(m["inter"], m["union"], self.empty_iou)  # (R, K)
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
            "inter": m["inter"],  # (R, K) pixel counts of each candidate's IoU with the target
            "union": m["union"],
        }
