"""Clicks of the interactive evaluation protocol, exactly as RITM places them
(SamsungLabs/ritm_interactive_segmentation, isegm/inference/clicker.py, ``Clicker._get_next_click``),
the protocol the SAM paper uses:

- false negatives FN = gt & ~pred, false positives FP = ~gt & pred, both outside the ignore region;
- each padded with one zero pixel (the image border counts as boundary) and distance-transformed
  (cv2.distanceTransform, DIST_L2, mask size 0 = DIST_MASK_PRECISE: exact Euclidean);
- distances at pixels already clicked set to 0 (RITM's ``not_clicked_map``);
- positive click when max FN distance > max FP distance (strict: a tie is a negative click), at the
  first pixel in row-major order (np.where) holding that region's maximum.

The first click is the same rule on an empty prediction: the distance-transform maximum of the mask
(``center_click``). When the prediction is exact (both maxima 0) RITM still places a click: negative,
at the first pixel whose FP distance equals the maximum 0, i.e. (0, 0); ``next_click`` does the same.

``random_click`` (uniform in the mask) is the SAM points task's optional first click, not RITM's.
This module holds the only implementation of click placement; opencv is the library call for the
distance transform (scipy's distance_transform_edt gives the same values, but RITM uses opencv).
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


def next_click(
    pred: np.ndarray,
    gt: np.ndarray,
    ignore: Optional[np.ndarray] = None,
    not_clicked: Optional[np.ndarray] = None,
) -> Tuple[int, int, int]:
    """(y, x, label) of RITM's next click: label POS (1) in the false negatives, NEG (0) in the
    false positives. pred, gt, ignore (pixels counted in neither region), not_clicked (False at
    pixels clicked before): (H, W) bool."""
    gt, pred = gt.astype(bool), pred.astype(bool)
    keep = np.ones_like(gt) if ignore is None else ~ignore.astype(bool)
    d_fn = distance_to_boundary(gt & ~pred & keep)
    d_fp = distance_to_boundary(~gt & pred & keep)
    if not_clicked is not None:
        d_fn, d_fp = d_fn * not_clicked, d_fp * not_clicked
    m_fn, m_fp = d_fn.max(), d_fp.max()
    d, m, label = (d_fn, m_fn, POS) if m_fn > m_fp else (d_fp, m_fp, NEG)
    ys, xs = np.where(d == m)  # row-major: the first is RITM's click
    return int(ys[0]), int(xs[0]), label


class Clicker:
    """RITM's Clicker for one object: remembers the pixels clicked so that no pixel is clicked
    twice. gt, ignore: (H, W) bool."""

    def __init__(self, gt: np.ndarray, ignore: Optional[np.ndarray] = None):
        self.gt = gt.astype(bool)
        self.ignore = None if ignore is None else ignore.astype(bool)
        self.not_clicked = np.ones_like(self.gt)
        self.clicks: list = []  # (y, x, label)

    def add(self, y: int, x: int, label: int) -> None:
        """Record a click placed by another rule (a random first click)."""
        self.not_clicked[y, x] = False
        self.clicks.append((int(y), int(x), int(label)))

    def click(self, pred: Optional[np.ndarray] = None) -> Tuple[int, int, int]:
        """The next click on the prediction pred ((H, W) bool; None: nothing predicted yet), recorded."""
        pred = np.zeros_like(self.gt) if pred is None else pred
        y, x, label = next_click(pred, self.gt, self.ignore, self.not_clicked)
        self.add(y, x, label)
        return y, x, label


def center_click(gt: np.ndarray) -> Optional[Tuple[int, int]]:
    """(y, x) of RITM's first click: the GT pixel farthest from the mask boundary (the first in
    row-major order on ties); None for an empty mask."""
    if not gt.any():
        return None
    return next_click(np.zeros_like(gt, dtype=bool), gt)[:2]


def random_click(gt: np.ndarray, rng: np.random.Generator) -> Optional[Tuple[int, int]]:
    """(y, x) of a GT pixel drawn uniformly; None for an empty mask."""
    ys, xs = np.nonzero(gt)
    if len(ys) == 0:
        return None
    i = int(rng.integers(len(ys)))
    return int(ys[i]), int(xs[i])
