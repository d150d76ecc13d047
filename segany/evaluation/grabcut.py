"""GrabCut (Rother et al. 2004, OpenCV's ``cv2.grabCut``) driven by RITM's clicker: the classical,
non-learned reference row of ``task=noc`` (``noc.baselines=[grabcut]``), in the same protocol as
the model (noc.object_ious: same clicker, objects, ignore region and IoU).

After each click the label map given to ``cv2.grabCut(..., GC_INIT_WITH_MASK)`` is

- everything "probably background" (GC_PR_BGD) with ``init=none``; with ``init=previous`` the
  previous prediction "probably foreground" (GC_PR_FGD) and the rest GC_PR_BGD (at click 1: none);
- a disk of ``prior_radius`` px around each positive click GC_PR_FGD (0: none);
- a disk of ``radius`` px around each positive click sure foreground (GC_FGD), around each
  negative click sure background (GC_BGD), drawn in click order; the clicked pixels themselves
  last, so that every click's own label holds whatever the disks overlap;

then ``iterations`` rounds of GMM fitting and min-cut; the prediction is GC_FGD | GC_PR_FGD. The
GMMs' k-means is seeded (cv2.setRNGSeed) before every call: the numbers are reproducible. A map
with fewer than 5 pixels on one side (cv2.grabCut's k-means needs 5 per GMM) is returned as it is.

The defaults (init=none, prior_radius=25) are the best of those tried on DAVIS-345 (radius 5,
5 iterations, 20 clicks). On 6 images (every 57th): init=none NoC@85/90 15.7/17.0, init=previous
18.3/18.8 (the previous mask drifts: mIoU@20 0.40 against 0.81); prior_radius 0/25/40/60 with
init=none NoC@85 15.7/14.3/16.3/16.5. On 35 images (every 10th; the command in
experiments/evaluation.md, "Reference rows"):

| prior_radius | NoC@80 | NoC@85 | NoC@90 | NoF@90 | mIoU@1 | mIoU@5 | mIoU@10 | mIoU@20 |
|---|---|---|---|---|---|---|---|---|
| 25 | 12.37 | 14.54 | 16.49 | 23 / 35 | 0.380 | 0.569 | 0.603 | 0.664 |
| 0 | 13.57 | 14.91 | 17.17 | 24 / 35 | 0.075 | 0.517 | 0.636 | 0.670 |

Without the prior, click 1 leaves little more than the seed disk (the background GMM, fitted to
the whole image, explains the object too). Reference: Graph cut (Boykov & Jolly 2001) on the
GrabCut set, NoC@85 7.98, NoC@90 10.00, as RITM's and f-BRS's tables give it. About 1-2 s per
click on one core at 854x480.
"""

from __future__ import annotations

from typing import Optional, Sequence

import cv2
import numpy as np

MIN_SAMPLES = 5  # cv2.grabCut's GMMs have 5 components: k-means needs at least as many pixels


class GrabCutSegmenter:
    """A segmenter for noc.object_ious: set_image once per image, then predict(clicks, state)
    after each click, state being what the previous call returned (None at click 1)."""

    def __init__(self, radius: int = 5, iterations: int = 5, init: str = "none", prior_radius: int = 25, seed: int = 0):
        if init not in ("previous", "none"):
            raise ValueError(f"noc.grabcut.init={init!r}: expected previous or none")
        if int(radius) < 0 or int(prior_radius) < 0 or int(iterations) < 1:
            raise ValueError(
                f"noc.grabcut: radius={radius}, prior_radius={prior_radius} (>= 0), iterations={iterations} (>= 1)"
            )
        self.radius, self.prior_radius, self.iterations = int(radius), int(prior_radius), int(iterations)
        self.init, self.seed = init, int(seed)
        self.image = None

    def set_image(self, image: np.ndarray) -> None:
        """(H, W, 3) uint8 RGB."""
        self.image = cv2.cvtColor(np.ascontiguousarray(image, np.uint8), cv2.COLOR_RGB2BGR)

    def reset_image(self) -> None:
        self.image = None

    def labels(self, clicks: Sequence, prev: Optional[np.ndarray]) -> np.ndarray:
        """clicks [(y, x, label)], prev (H, W) bool or None -> (H, W) uint8 GC_* label map."""
        if self.init == "previous" and prev is not None:
            gc = np.where(prev, cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
        else:
            gc = np.full(self.image.shape[:2], cv2.GC_PR_BGD, np.uint8)
        for y, x, label in clicks if self.prior_radius else ():
            if label:
                cv2.circle(gc, (int(x), int(y)), self.prior_radius, cv2.GC_PR_FGD, -1)
        for y, x, label in clicks:
            cv2.circle(gc, (int(x), int(y)), self.radius, cv2.GC_FGD if label else cv2.GC_BGD, -1)
        for y, x, label in clicks:
            gc[y, x] = cv2.GC_FGD if label else cv2.GC_BGD
        return gc

    def predict(self, clicks: Sequence, prev: Optional[np.ndarray] = None) -> tuple:
        """All clicks so far and the previous prediction -> ((H, W) bool prediction, the same as state)."""
        gc = self.labels(clicks, prev)
        fg = (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)
        if min(np.count_nonzero(fg), np.count_nonzero(~fg)) >= MIN_SAMPLES:
            cv2.setRNGSeed(self.seed)
            bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)  # GMM parameters
            cv2.grabCut(self.image, gc, None, bgd, fgd, self.iterations, cv2.GC_INIT_WITH_MASK)
            fg = (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)
        return fg, fg
