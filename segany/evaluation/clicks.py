"""Clicks of the interactive evaluation protocol (RITM, used by the SAM paper):
the first click at the maximum of the mask's distance transform (its "centre"; or, as an
option, uniform at random in the mask), each next
click at the point of the error region farthest from the region's boundary, positive in a
false negative, negative in a false positive region.

Distances are exact Euclidean (OpenCV DIST_MASK_PRECISE), with the image border counted
as boundary (one zero pixel padded around).
"""

from __future__ import annotations

from typing import Optional, Tuple

import cv2
import numpy as np

from segany.modeling.constants import NEG, POS


def distance_to_boundary(region: np.ndarray) -> np.ndarray:
    """(H, W) bool -> (H, W) float32 distance of each region pixel to the nearest pixel
    outside the region (or outside the image); 0 outside the region."""
    padded = np.pad(region.astype(np.uint8), 1)
    return cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]


def center_click(gt: np.ndarray) -> Optional[Tuple[int, int]]:
    """(y, x) of the GT pixel farthest from the mask boundary; None for an empty mask."""
    if not gt.any():
        return None
    d = distance_to_boundary(gt)
    return tuple(int(v) for v in np.unravel_index(int(d.argmax()), d.shape))


def random_click(gt: np.ndarray, rng: np.random.Generator) -> Optional[Tuple[int, int]]:
    """(y, x) of a GT pixel drawn uniformly; None for an empty mask."""
    ys, xs = np.nonzero(gt)
    if len(ys) == 0:
        return None
    i = int(rng.integers(len(ys)))
    return int(ys[i]), int(xs[i])


def next_click(pred: np.ndarray, gt: np.ndarray) -> Optional[Tuple[int, int, int]]:
    """(y, x, label) of the corrective click: label POS (1) in the false negatives, NEG (0) in the
    false positives, whichever error region has the larger inner distance; None when the
    prediction is already exact."""
    fn, fp = gt & ~pred, pred & ~gt
    d_fn, d_fp = distance_to_boundary(fn), distance_to_boundary(fp)
    m_fn, m_fp = float(d_fn.max(initial=0)), float(d_fp.max(initial=0))
    if m_fn == 0 and m_fp == 0:
        return None
    d, label = (d_fn, POS) if m_fn >= m_fp else (d_fp, NEG)
    y, x = np.unravel_index(int(d.argmax()), d.shape)
    return int(y), int(x), label
