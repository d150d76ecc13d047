"""Fine-structure metrics of a predicted mask against its ground truth: boundary IoU and the
number of spurious connected components.

Boundary IoU (Cheng et al., "Boundary IoU: Improving Object-Centric Image Segmentation
Evaluation", CVPR 2021) = |G_d ∩ P_d| / |G_d ∪ P_d|, where X_d is the inner boundary of mask X:
its pixels within distance d of the contour. As the reference (boundary-iou-api,
boundary_iou/utils/boundary_utils.py mask_to_boundary): X_d = X minus X eroded d times by a 3x3
square with the outside of the image counted as background (so a mask cut by the image border has
a boundary there), d = max(1, round(ratio x image diagonal)). d iterations of a 3x3 erosion
remove the pixels within square (Chebyshev) distance d of the background, which is one erosion by
a (2d+1)^2 square: done here as two 1-D running sums (cumsum) of the complement, whatever d, on
the masks' device.

A spurious component is an 8-connected component of the prediction with no pixel in the ground
truth (cv2.connectedComponents, as segany.inference.amg_utils uses it).
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from segany.evaluation.metrics import iou_from_counts

DILATION_RATIO = 0.02  # the paper's d / image diagonal


def boundary_dilation(height: int, width: int, ratio: float = DILATION_RATIO) -> int:
    """The reference's d in pixels: max(1, round(ratio * sqrt(h^2 + w^2))) (Python's round)."""
    if not ratio > 0:
        raise ValueError(f"boundary_dilation_ratio={ratio}: a positive fraction of the image diagonal")
    return max(1, int(round(ratio * math.sqrt(height**2 + width**2))))


@torch.no_grad()
def inner_boundary(masks: Tensor, dilation: int) -> Tensor:
    """(..., H, W) bool -> (..., H, W) bool: the pixels of each mask within square distance
    ``dilation`` of its background or of the image's edge (mask_to_boundary of the reference)."""
    d = int(dilation)
    shape = masks.shape
    x = (~masks.bool()).reshape(-1, *shape[-2:]).to(torch.int32)  # (n, H, W) complement: background = 1
    x = F.pad(x, (d, d, d + 1, d), value=1)  # the image's outside is background; a zero-sum row above
    x[:, 0] = 0
    c = x.cumsum(1, dtype=torch.int32)
    x = c[:, 2 * d + 1 :] - c[:, : -2 * d - 1]  # (n, H, W + 2d): background pixels within d along y
    c = F.pad(x, (1, 0)).cumsum(2, dtype=torch.int32)
    x = c[:, :, 2 * d + 1 :] - c[:, :, : -2 * d - 1]  # (n, H, W): ... within the (2d+1)^2 square
    return masks.bool() & (x.reshape(shape) > 0)


@torch.no_grad()
def boundary_iou(
    pred: Tensor, gt: Tensor, dilation: Union[int, Sequence[int], Tensor], empty: float = 1.0, chunk: int = 64
) -> Tensor:
    """(R, H, W) bool prediction and ground truth -> (R,) boundary IoU of their inner boundaries;
    dilation: one d for all, or one per row ((R,), e.g. per image size: boundary_dilation).
    ``empty`` (as mask_iou's) when both masks are empty; 0 when only one is (a non-empty mask
    always has a boundary). The masks go through the erosion ``chunk`` at a time."""
    R = pred.shape[0]
    d = torch.as_tensor(dilation).reshape(-1).cpu()
    d = d.expand(R) if d.numel() == 1 else d
    if d.numel() != R:
        raise ValueError(f"boundary_iou: {d.numel()} dilations for {R} masks")
    inter = torch.zeros(R, device=pred.device)
    union = torch.zeros(R, device=pred.device)
    for v in d.unique().tolist():  # one erosion per distinct d (per image size)
        for rows in (d == v).nonzero()[:, 0].to(pred.device).split(chunk):  # bounded int32 temporaries
            bp, bg = inner_boundary(pred[rows], v), inner_boundary(gt[rows], v)
            inter[rows] = (bp & bg).flatten(1).sum(1).float()
            union[rows] = (bp | bg).flatten(1).sum(1).float()
    return iou_from_counts(inter, union, empty)


def spurious_components(pred, gt) -> np.ndarray:
    """(R, H, W) or (H, W) bool prediction and ground truth (numpy or torch) -> (R,) int64: the
    number of 8-connected components of each prediction that share no pixel with its ground truth."""
    pred = pred.cpu().numpy() if torch.is_tensor(pred) else np.asarray(pred)
    gt = gt.cpu().numpy() if torch.is_tensor(gt) else np.asarray(gt)
    pred, gt = pred.reshape(-1, *pred.shape[-2:]), gt.reshape(-1, *gt.shape[-2:]).astype(bool)
    out = np.zeros(len(pred), np.int64)
    for r in range(len(pred)):  # cv2's labelling, a mask at a time
        n, labels = cv2.connectedComponents(np.ascontiguousarray(pred[r], np.uint8), connectivity=8)
        touches = np.bincount(labels[gt[r]], minlength=n) > 0  # (n,): component 0 is the background
        out[r] = n - 1 - int(touches[1:].sum())
    return out
