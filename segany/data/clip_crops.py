"""The image crop whose CLIP embedding is a mask's text prompt in training (SAM paper §7.5,
appendix D.5): a square around the mask's box, enlarged by a random factor, with the
background outside the mask zeroed with probability 0.5.

Paper (appendix D.5): masks with area > 100^2 px; the crop around the mask is expanded by a
random factor in [1x, 2x]; background zeroed in half of the crops. The enlargement range is
our reading of that appendix (it could not be re-checked against the paper's text from this
machine): `scale` makes it a setting. Square, because CLIP's input is square (no aspect
distortion when it is resized); clipped to the image (no padding added).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

PAPER_MIN_AREA = 100 * 100  # px, original resolution
PAPER_SCALE = (1.0, 2.0)  # random enlargement of the crop around the mask
PAPER_P_ZERO_BACKGROUND = 0.5


def mask_box(mask: np.ndarray) -> Tuple[int, int, int, int]:
    """(H, W) bool -> its box (x0, y0, x1, y1), end exclusive. Raises on an empty mask."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if len(ys) == 0:
        raise ValueError("mask_box: the mask is empty")
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


def crop_box(box: Sequence[int], factor: float, height: int, width: int) -> Tuple[int, int, int, int]:
    """A square of side factor * (the box's longer side) centred on the box (x0, y0, x1, y1, end
    exclusive), rounded to pixels and clipped to the (height, width) image; same convention."""
    x0, y0, x1, y1 = box
    side = factor * max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    cx0, cy0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    s = int(round(side))
    return max(cx0, 0), max(cy0, 0), min(cx0 + s, width), min(cy0 + s, height)


def mask_crop(image: np.ndarray, mask: np.ndarray, factor: float, zero_background: bool) -> np.ndarray:
    """(H, W, 3) uint8 image, (H, W) bool mask -> the (h, w, 3) uint8 crop (a copy); pixels
    outside the mask set to 0 when zero_background."""
    x0, y0, x1, y1 = crop_box(mask_box(mask), factor, *mask.shape)
    crop = image[y0:y1, x0:x1].copy()
    if zero_background:
        crop[~mask[y0:y1, x0:x1]] = 0
    return crop


def sample_crop(
    image: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    scale: Sequence[float] = PAPER_SCALE,
    p_zero_background: float = PAPER_P_ZERO_BACKGROUND,
    factor: Optional[float] = None,
) -> np.ndarray:
    """`mask_crop` with the enlargement drawn uniformly in `scale` and the background zeroed with
    probability `p_zero_background`, both from `rng` (a given `factor` is used instead)."""
    lo, hi = float(scale[0]), float(scale[1])
    if not 1.0 <= lo <= hi:
        raise ValueError(f"crop scale {list(scale)}: expected [min, max] with 1 <= min <= max")
    f = float(rng.uniform(lo, hi)) if factor is None else float(factor)
    zero = bool(rng.random() < p_zero_background)
    return mask_crop(image, mask, f, zero)
