"""Decoding stored samples: image bytes to an array (the one image decoder of the training
data, evaluation and the data engine), COCO RLE to a boolean mask (the one full-size RLE decode),
sample keys to integer image ids."""

from __future__ import annotations

import math
import re
import zlib

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from segany.data.faults import SampleFault
from segany.data.formats import rle


def numeric_id(key: str) -> int:
    """Integer image id of a sample key: the key itself if numeric, else its trailing digits
    (sa_123 -> 123), else a CRC32 of it."""
    if key.isdigit():
        return int(key)
    m = re.search(r"(\d+)$", key)
    return int(m.group(1)) if m else zlib.crc32(key.encode())


def _jpeg_complete(data: bytes) -> bool:
    # A JPEG ends with the EOI marker FFD9, which cannot occur inside entropy-coded data.
    return data.rfind(b"\xff\xd9", max(2, len(data) - 4096)) != -1


_REDUCED = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}


def decode_image(
    data: bytes,
    where: str = "",
    *,
    bgr: bool = False,
    size: tuple[int, int] | None = None,
    need: tuple[int, int] | None = None,
) -> np.ndarray:
    """Image bytes -> (h, w, 3) uint8, RGB (bgr=True: BGR as cv2 decodes it, no channel copy:
    the training path's normalize_pad reads it reversed), pixels as stored (EXIF orientation
    ignored). size=(h, w): the size the annotations give; any other is refused. need=(nh, nw)
    (with size): a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling, several
    times faster) as long as it stays at least that large.

    Every failure is a SampleFault("bad_image", "<where>: why"): the data pipeline counts and
    skips the sample (faults.py); a caller outside it gets that error, naming the file."""

    def fault(why: str):
        return SampleFault("bad_image", f"{where}: {why}" if where else why)

    if not data:
        raise fault("empty image file")
    is_jpeg = data[:2] == b"\xff\xd8"
    if is_jpeg and not _jpeg_complete(data):
        raise fault("truncated JPEG (no end-of-image marker)")
    f = 1
    if is_jpeg and need is not None and size is not None:
        h, w = size
        f = next((c for c in (8, 4, 2) if math.ceil(h / c) >= need[0] and math.ceil(w / c) >= need[1]), 1)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED[f] | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise fault("image does not decode")
    if size is not None and img.shape[:2] != (math.ceil(size[0] / f), math.ceil(size[1] / f)):
        got = f"{img.shape[0] * f}x{img.shape[1] * f}" + (f" (scale 1/{f})" if f > 1 else "")
        raise fault(f"image is {got}, annotations say {size[0]}x{size[1]}")
    return img if bgr else np.ascontiguousarray(img[..., ::-1])


def decode_mask(seg: dict, where: str = "") -> np.ndarray:
    """COCO RLE -> (H, W) bool, C-contiguous: compressed (``counts`` a str or bytes, as json files
    hold it) or uncompressed (a list of run lengths, as the mask generator makes), decoded by
    pycocotools. Checked first, because pycocotools trusts its input (runs summing to less than
    H*W leave uninitialised memory): negative runs, or runs that do not sum to H*W, are a
    SampleFault("bad_json", "<where>: invalid RLE ..."), as in the training data. (The training
    data itself never decodes a full-size mask: formats/rle.py samples masks at the output size.)"""
    h, w = (int(v) for v in seg["size"])
    counts = seg["counts"]
    if isinstance(counts, (str, bytes)):
        ok = bool(rle.parse([counts], [h], [w]).valid[0])
        enc = {"size": [h, w], "counts": counts.encode() if isinstance(counts, str) else counts}
    else:
        runs = np.asarray(counts, np.int64)
        ok = runs.ndim == 1 and bool((runs >= 0).all()) and int(runs.sum()) == h * w
        enc = mask_utils.frPyObjects({"size": [h, w], "counts": list(counts)}, h, w) if ok else None
    if not ok:
        where = f"{where}: " if where else ""
        raise SampleFault("bad_json", f"{where}invalid RLE (counts do not decode to {h}x{w} pixels)")
    fortran = mask_utils.decode(enc)  # (H, W) uint8 0/1, column-major
    return cv2.transpose(fortran.T).view(bool)  # row-major; cv2's blocked transpose is ~2x numpy's copy
