"""Decoding stored samples for evaluation and the data engine: image bytes to RGB, COCO RLE
to a boolean mask, sample keys to integer image ids."""

from __future__ import annotations

import re
import zlib

import cv2
import numpy as np
from pycocotools import mask as mask_utils


def numeric_id(key: str) -> int:
    """Integer image id of a sample key: the key itself if numeric, else its trailing digits
    (sa_123 -> 123), else a CRC32 of it."""
    if key.isdigit():
        return int(key)
    m = re.search(r"(\d+)$", key)
    return int(m.group(1)) if m else zlib.crc32(key.encode())


def decode_rgb(data: bytes, where: str) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise ValueError(f"{where}: image does not decode")
    return np.ascontiguousarray(img[..., ::-1])


def decode_mask(seg: dict) -> np.ndarray:
    """COCO RLE (str or bytes counts) -> (H, W) bool."""
    counts = seg["counts"]
    return mask_utils.decode(
        {"size": list(seg["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}
    ).astype(bool)
