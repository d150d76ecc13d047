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
from torch import Tensor

from segany.evaluation.metrics import iou_from_counts, mask_iou  # noqa: F401  (re-exported)

CHUNK = 1 << 21  # elements of (rows, K, H*W) per chunk of the fused mask terms: its temporaries stay in cache


class _MaskTerms(torch.autograd.Function):
    """Focal and dice of every candidate mask, and the counts of its IoU, in one fused pass.

    Hand-written rather than torchvision's ``sigmoid_focal_loss`` + a dice on ``sigmoid``: at the
    full-resolution loss (S = 1024, 3 candidates per mask) those are ~30 separate passes over
    (R, 3, S, S) tensors, each saved for backward, and the step's largest non-matmul cost. Here,
    for binary targets, with y = x (t = 0) or -x (t = 1) and q = sigmoid(y) (= 1 - p_t):
    focal = a_t q^gamma softplus(y), p = t + (1 - 2t) q, and every pixel sum is a product
    with per-row pixel weights; backward is the closed form of the same terms,
    recomputed chunk by chunk from the logits (nothing else is saved).

    x (R, K, P) logits, w (R, 4, P) per-pixel weights [a_t * in, (1 - 2t) * in, t * in, in]
    (in = the pixels that count), n_in, n_t, n_t_all (R,) the sums of in, t * in and t, gamma,
    smooth -> focal (R, K) mean over the pixels in, dice (R, K), inter (R, K), union (R, K) of
    (x > 0) inside with t (counts, no gradient). As before this fusion, |t| in dice and the
    union counts the whole target (it is zero outside the image content anyway).
    """

    @staticmethod
    def forward(ctx, x, w, n_in, n_t, n_t_all, gamma, smooth):
        R, K, P = x.shape
        sums = x.new_empty(5, R, K)  # sum a_t f, sum sgn q, sum t q, sum pred t, sum pred (inside)
        for r0, r1 in _chunks(R, K * P):
            xc, wc = x[r0:r1], w[r0:r1, :, None]  # (r, K, P), (r, 4, 1, P)
            y = xc * wc[:, 1].sign()  # (r, K, P) x or -x inside, 0 outside (weights 0 there)
            q = torch.sigmoid(y)
            f = torch.nn.functional.softplus(y).mul_(q.pow(gamma) if gamma != 2 else q.square())
            pos = (xc > 0).to(x.dtype)
            for i, (v, j) in enumerate(((f, 0), (q, 1), (q, 2), (pos, 2), (pos, 3))):
                # products then sum (cascade summation; a bmm over 1M pixels would lose ~1e-4)
                torch.sum(v * wc[:, j], dim=-1, out=sums[i, r0:r1])
        focal, qs0, qs1, inter, pin = sums
        n, nt, nt_all = n_in[:, None], n_t[:, None], n_t_all[:, None]  # (R, 1)
        psum = nt + qs0  # sum p
        inter_p = nt - qs1  # sum p * t
        num, den = 2 * inter_p + smooth, psum + nt_all + smooth
        union = pin + nt_all - inter
        ctx.save_for_backward(x, w, n_in, num, den)
        ctx.gamma = gamma
        ctx.mark_non_differentiable(inter, union)
        return focal / n.clamp(min=1), 1 - num / den, inter, union

    @staticmethod
    def backward(ctx, g_focal, g_dice, _gi, _gu):
        x, w, n_in, num, den = ctx.saved_tensors
        gamma = ctx.gamma
        R, K, P = x.shape
        gf = (g_focal / n_in[:, None].clamp(min=1))[..., None]  # (R, K, 1)
        c1 = (g_dice * num / den.square())[..., None]  # d dice / d p = in * (num / den^2 - 2 t / den)
        c2 = (-2 * g_dice / den)[..., None]
        grad = torch.empty_like(x)
        for r0, r1 in _chunks(R, K * P):
            xc, wc = x[r0:r1], w[r0:r1, :, None]  # (r, K, P), (r, 4, 1, P)
            sgn = wc[:, 1].sign()  # (r, 1, P) 1 - 2t inside, 0 outside
            y = xc * sgn
            q = torch.sigmoid(y)
            u = q * (1 - q)  # dp/dx = dq/dy
            # d focal / dx = sgn a_t q^gamma (gamma (1 - q) softplus(y) + q)
            d = torch.nn.functional.softplus(y).mul_(1 - q).mul_(gamma).add_(q)
            d.mul_(q.pow(gamma) if gamma != 2 else q.square()).mul_(gf[r0:r1]).mul_(wc[:, 0] * sgn)
            # dice: u * in * (c1 + c2 t)
            d.addcmul_(u, torch.addcmul(c1[r0:r1] * wc[:, 3], c2[r0:r1], wc[:, 2]))
            grad[r0:r1] = d
        return grad, None, None, None, None, None, None


def _chunks(rows: int, per_row: int):
    step = max(1, CHUNK // max(per_row, 1))
    return ((r0, min(r0 + step, rows)) for r0 in range(0, rows, step))


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
    / (|p| + |t| + s) on the inside pixels) and ``inter`` / ``union`` pixel counts of (logits > 0)
    with the target inside (the IoU; no gradient). One fused pass (``_MaskTerms``)."""
    R, K, H, W = logits.shape
    t = targets.reshape(targets.shape[0], targets.shape[1], H * W)
    if t.shape[1] != 1:  # one target per candidate: rows of candidates
        out = mask_terms(
            logits.reshape(R * K, 1, H, W),
            targets.reshape(R * K, 1, H, W),
            alpha,
            gamma,
            smooth,
            None if inside is None else inside.expand(R, K, H, W).reshape(R * K, 1, H, W),
        )
        return {k: v.view(R, K) for k, v in out.items()}
    x = logits.float().reshape(R, K, H * W)
    t = t[:, 0].to(x.dtype) > 0.5
    tf = t.to(x.dtype)  # (R, P)
    ins = torch.ones_like(tf) if inside is None else inside.reshape(R, H * W).to(x.dtype)
    a_t = torch.ones_like(tf) if alpha < 0 else (1 - alpha) + (2 * alpha - 1) * tf
    w = torch.stack((a_t * ins, (1 - 2 * tf) * ins, tf * ins, ins), dim=1)  # (R, 4, P)
    n_in, n_t, n_t_all = ins.sum(1), (tf * ins).sum(1), tf.sum(1)  # (R,)
    focal, dice, inter, union = _MaskTerms.apply(x, w, n_in, n_t, n_t_all, float(gamma), float(smooth))
    return {"focal": focal, "dice": dice, "inter": inter, "union": union}


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
        m = mask_terms(logits, target[:, None], self.focal_alpha, self.focal_gamma, inside=ins)
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
