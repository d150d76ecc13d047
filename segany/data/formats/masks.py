"""Mask image files -> objects: the one decoder of mask PNGs, shared by the benchmark layouts
(formats/ritm.py) and the image-folder formats (formats/folders.py).

  binary_mask   one object per file: any channel > 0 (0/1 and 0/255 PNGs alike; palette PNGs
                are read as colours, as cv2.imread does)
  label_image   instance ids as stored: 8/16-bit grey values, palette indices (not their
                colours), or for an RGB(A) PNG the colour R * 2^16 + G * 2^8 + B (COCO panoptic's id)
  split_labels  a label image -> one mask per non-zero value, plus an ignore region

Pillow reads label images because only it gives a palette PNG's indices (cv2 expands them);
errors are ValueErrors that name the file.
"""

from __future__ import annotations

from typing import Optional

import cv2
import numpy as np
from PIL import Image


def imread(path: str, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    img = cv2.imread(path, flags)
    if img is None:
        raise ValueError(f"{path}: mask does not decode")
    return img


def binary_mask(path: str) -> np.ndarray:
    """(H, W) bool: pixels where any channel of the file is > 0."""
    return imread(path).max(axis=2) > 0


def label_image(path: str) -> np.ndarray:
    """(H, W) int64 instance ids of an id PNG (see the module docstring)."""
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.array(im)
    except Exception as exc:  # noqa: BLE001 - Pillow raises several kinds for damaged files
        raise ValueError(f"{path}: mask does not decode ({exc})") from None
    if mode in ("P", "L", "1", "I", "I;16", "I;16B", "I;16L"):
        return arr.astype(np.int64)
    if mode in ("RGB", "RGBA"):
        rgb = arr[..., :3].astype(np.int64)
        return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    raise ValueError(f"{path}: PNG mode {mode} is not an instance-id image (grey, 16-bit, palette or RGB)")


def split_labels(label: np.ndarray, ignore_value: Optional[int] = None) -> tuple:
    """(H, W) ids -> (ids (A,) int64 ascending, masks: A (H, W) bool masks made one at a time as
    they are iterated, ignore (H, W) bool): one object per value other than 0 and ignore_value."""
    ignore = label == ignore_value if ignore_value is not None else np.zeros(label.shape, bool)
    ids = np.array([int(v) for v in np.unique(label) if v != 0 and v != ignore_value], np.int64)
    return ids, (label == v for v in ids), ignore
