"""Geometry shared by the image and its masks: resize longest side to S (optionally with
large-scale jitter and a random crop), horizontal flip, zero padding to S x S.

Both the image and the masks go through the same `Geometry`: the image with cv2 (area
interpolation when shrinking by more than 2, bilinear otherwise), the masks by nearest sampling at
the same pixel centres (see rle.sample_grid), so they stay aligned to within half a
source pixel; boxes are computed from the transformed masks, so they are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from segany.data.formats.rle import sample_grid
from segany.modeling.constants import PIXEL_MEAN, PIXEL_STD
from segany.modeling.transforms import get_preprocess_shape


@dataclass
class Geometry:
    h: int  # original size
    w: int
    nh: int  # size after scaling (before crop)
    nw: int
    y0: int  # crop origin in the scaled image
    x0: int
    ch: int  # content size in the output (= input_size), <= size
    cw: int
    flip: bool
    size: int  # S, the padded output is S x S

    @property
    def rows(self) -> np.ndarray:  # (ch,) source row sampled by each output row
        return sample_grid(self.h, self.ch, self.nh / self.h, self.y0)

    @property
    def cols(self) -> np.ndarray:  # (cw,) source column sampled by each output column (before flip)
        return sample_grid(self.w, self.cw, self.nw / self.w, self.x0)


def resized_shape(h: int, w: int, target: float) -> tuple[int, int]:
    """Longest side -> target (a float under jitter): the model's `get_preprocess_shape`
    (int(side * s + 0.5), as the release), each side at least 1 px, which jitter needs: a
    thin image scaled down can round a side to 0."""
    nh, nw = get_preprocess_shape(h, w, target)
    return max(1, nh), max(1, nw)


def plan(h: int, w: int, size: int, rng: np.random.Generator, jitter=None, flip_prob: float = 0.0) -> Geometry:
    """jitter: None, or (min, max) scale of large-scale jitter relative to `size`."""
    if jitter is None:
        nh, nw = resized_shape(h, w, size)
        y0 = x0 = 0
    else:
        scale = rng.uniform(jitter[0], jitter[1])
        nh, nw = resized_shape(h, w, size * scale)
        y0 = int(rng.integers(0, max(nh - size, 0) + 1))
        x0 = int(rng.integers(0, max(nw - size, 0) + 1))
    flip = bool(flip_prob > 0 and rng.random() < flip_prob)
    return Geometry(h, w, nh, nw, y0, x0, min(size, nh - y0), min(size, nw - x0), flip, size)


def warp_image(img: np.ndarray, g: Geometry) -> np.ndarray:
    """(h', w', 3) uint8 (any decode scale) -> (ch, cw, 3) uint8 content of the output."""
    if img.shape[:2] != (g.nh, g.nw):
        # area averaging where bilinear would alias (shrinking by more than 2: after a reduced
        # JPEG decode the remaining factor is below 2), bilinear otherwise
        strong = img.shape[0] > 2 * g.nh or img.shape[1] > 2 * g.nw
        img = cv2.resize(img, (g.nw, g.nh), interpolation=cv2.INTER_AREA if strong else cv2.INTER_LINEAR)
    img = img[g.y0 : g.y0 + g.ch, g.x0 : g.x0 + g.cw]
    return cv2.flip(img, 1) if g.flip else img


_SCALE = 1.0 / np.array(PIXEL_STD, np.float32)  # RGB
_SHIFT = -np.array(PIXEL_MEAN, np.float32) * _SCALE


def normalize_pad(content_bgr: np.ndarray, size: int) -> np.ndarray:
    """(ch, cw, 3) uint8 BGR -> (3, size, size) float32 RGB, normalised, zero-padded bottom/right."""
    ch, cw = content_bgr.shape[:2]
    out = np.zeros((3, size, size), np.float32)
    for c in range(3):  # RGB plane c <- BGR channel 2 - c
        plane = out[c, :ch, :cw]
        np.multiply(content_bgr[:, :, 2 - c], _SCALE[c], out=plane, casting="unsafe")
        plane += _SHIFT[c]
    return out


def place_masks(cols_major: np.ndarray, g: Geometry) -> np.ndarray:
    """(M, cw, ch) uint8 0/1 (transposed grid, unflipped) -> (M, S, S) bool, flipped if g.flip."""
    m = cols_major.shape[0]
    out = np.zeros((m, g.size, g.size), bool)
    view = out.view(np.uint8)
    for i in range(m):
        if g.flip:
            cv2.flip(cv2.transpose(cols_major[i]), 1, dst=view[i, : g.ch, : g.cw])
        else:
            cv2.transpose(cols_major[i], dst=view[i, : g.ch, : g.cw])
    return out


def flip_boxes(boxes: np.ndarray, g: Geometry) -> np.ndarray:
    """(M, 4) x0, y0, x1, y1 inclusive on the unflipped grid -> as placed in the output."""
    if not g.flip:
        return boxes
    out = boxes.copy()
    out[:, 0] = g.cw - 1 - boxes[:, 2]
    out[:, 2] = g.cw - 1 - boxes[:, 0]
    return out


def lowres(masks: np.ndarray, g: Geometry) -> np.ndarray:
    """(M, S, S) bool -> (M, S/4, S/4) bool: fraction of each 4x4 block inside the mask > 0.5."""
    m, s = masks.shape[0], g.size // 4
    out = np.zeros((m, s, s), bool)
    bh, bw = -(-g.ch // 4), -(-g.cw // 4)  # blocks touching the content
    view, oview = masks.view(np.uint8), out.view(np.uint8)
    for i in range(m):
        block = view[i, : 4 * bh, : 4 * bw] * np.uint8(16)  # area average of 0/16 = exact count
        counts = cv2.resize(block, (bw, bh), interpolation=cv2.INTER_AREA)
        oview[i, :bh, :bw] = counts > 8
    return out
