"""Mask IoU of predicted logits against a ground-truth mask: the interactive protocol's
metric, and the IoU head's regression target in training (segany.training.losses)."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def mask_iou(logits: Tensor, targets: Tensor, threshold: float = 0.0, empty: float = 1.0) -> Tensor:
    """(R, K, H, W) logits, bool or 0/1 float targets -> (R, K) IoU of (logits > threshold)
    with the target; ``empty`` when both are empty. No gradient (a count ratio)."""
    pred = (logits > threshold).flatten(-2)
    t = targets.flatten(-2) > 0.5
    return iou_from_counts((pred & t).sum(-1).float(), (pred | t).sum(-1).float(), empty)


def iou_from_counts(inter: Tensor, union: Tensor, empty: float = 1.0) -> Tensor:
    """Pixel counts -> IoU = inter / union, ``empty`` where the union is empty."""
    return torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(union, empty))
