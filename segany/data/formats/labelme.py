"""labelme json (one file per image) -> the image and its objects, without labelme.

    {"imagePath": "a.jpg", "imageData": base64 or null, "imageHeight": h, "imageWidth": w,
     "shapes": [{"label": str, "points": [[x, y], ...], "group_id": int or null,
                 "shape_type": "polygon" | "rectangle" | "circle" | "mask" | "line" | "point" ...,
                 "mask": base64 PNG (shape_type mask only)}, ...]}

Objects, as labelme's own converters group them: the shapes of one (label, group_id) are one
object (their union); a shape whose group_id is null is an object by itself. Ids 1, 2, ... in order
of first appearance (objects without a pixel left out). Only area shapes make masks: line,
linestrip, point and points shapes are not objects and are passed over.

Rasterisation, pixel (x, y) at integer coordinates, boundary pixels included as labelme draws
them (PIL ImageDraw, outline=1, fill=1): polygon (cv2.fillPoly), rectangle between its two corners
(both corner pixels in), points placed at 1/16 pixel (cv2's shift=4); circle: the pixels within
the distance from its centre to its second point. Axis-aligned edges give labelme's pixels exactly;
slanted edges and circles may differ from PIL's by a pixel along the boundary. A mask shape is
the PNG in `mask` placed with its top-left pixel at int(points[0]).

Image: `imageData` when present (what labelme itself shows), else the file `imagePath` relative
to the json's folder (else its base name in a fallback image folder). Errors: SampleFault
(bad_json: the file or a field is unusable; bad_image: the image cannot be read or has another
size than imageHeight x imageWidth) naming the field; a single unusable shape is reported by
`objects` without dropping the others.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
from typing import Optional

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from segany.data.faults import SampleFault

AREA_SHAPES = ("polygon", "rectangle", "circle", "mask")
OTHER_SHAPES = ("line", "linestrip", "point", "points")
_SHIFT = 4  # cv2 sub-pixel bits: coordinates at 1/16 pixel


def load(path: str) -> dict:
    """Parse and check a labelme json (top-level fields; shapes are checked one by one later)."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except OSError as exc:
        raise SampleFault("bad_json", f"cannot read: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise SampleFault("bad_json", f"not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("shapes"), list):
        raise SampleFault("bad_json", "missing list field 'shapes' (not a labelme file)")
    if not data.get("imageData") and not isinstance(data.get("imagePath"), str):
        raise SampleFault("bad_json", "neither 'imageData' nor 'imagePath'")
    return data


def image(data: dict, json_path: str, images_dir: Optional[str] = None) -> tuple:
    """(image bytes or None, image file path or None): imageData decoded, else the file to read."""
    if data.get("imageData"):
        try:
            return base64.b64decode(data["imageData"], validate=True), None
        except (binascii.Error, TypeError, ValueError) as exc:
            raise SampleFault("bad_json", f"field 'imageData' is not base64: {exc}") from None
    rel = data["imagePath"].replace("\\", "/")  # labelme on Windows writes backslashes
    path = os.path.join(os.path.dirname(json_path), rel)
    if not os.path.isfile(path) and images_dir:
        path = os.path.join(images_dir, os.path.basename(rel))
    return None, path


def image_size(data: dict, image_bytes: Optional[bytes], image_path: Optional[str]) -> tuple:
    """(h, w) of the image from its header (nothing decoded), checked against imageHeight / imageWidth."""
    try:
        with Image.open(io.BytesIO(image_bytes) if image_bytes is not None else image_path) as im:
            w, h = im.size
    except Exception as exc:  # noqa: BLE001 - Pillow raises several kinds
        raise SampleFault("bad_image", f"image {image_path or 'imageData'} cannot be read: {exc}") from None
    for field, v in (("imageHeight", h), ("imageWidth", w)):
        if data.get(field) is not None and data[field] != v:
            raise SampleFault("bad_image", f"{field} is {data[field]} but the image is {h}x{w}")
    return h, w


def _points(shape: dict, n: Optional[int] = None) -> np.ndarray:
    try:
        pts = np.asarray(shape.get("points"), np.float64)
    except (TypeError, ValueError):
        raise ValueError("'points' is not a list of [x, y]") from None
    if pts.ndim != 2 or pts.shape[1] != 2 or not np.isfinite(pts).all():
        raise ValueError("'points' is not a list of [x, y]")
    if n is not None and len(pts) != n:
        raise ValueError(f"a {shape.get('shape_type')} needs {n} points, got {len(pts)}")
    return pts


def _fixed(pts: np.ndarray) -> np.ndarray:
    return np.round(pts * (1 << _SHIFT)).astype(np.int32)


def shape_mask(shape: dict, h: int, w: int) -> Optional[np.ndarray]:
    """(h, w) bool mask of one shape; None for a shape without area; ValueError says why not."""
    kind = shape.get("shape_type") or "polygon"
    if kind in OTHER_SHAPES:
        return None
    out = np.zeros((h, w), np.uint8)
    if kind == "polygon":
        pts = _points(shape)
        if len(pts) < 3:
            raise ValueError(f"a polygon needs at least 3 points, got {len(pts)}")
        cv2.fillPoly(out, [_fixed(pts)], 1, cv2.LINE_8, _SHIFT)
    elif kind == "rectangle":
        (x0, y0), (x1, y1) = np.sort(_points(shape, 2), axis=0)
        cv2.fillPoly(out, [_fixed(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]))], 1, cv2.LINE_8, _SHIFT)
    elif kind == "circle":  # pixels within r of the centre (cv2.circle rounds the radius to 1/16 px, outwards)
        (cx, cy), p = _points(shape, 2)
        r2 = float(((p - (cx, cy)) ** 2).sum())
        yy, xx = np.ogrid[:h, :w]
        out[(xx - cx) ** 2 + (yy - cy) ** 2 <= r2] = 1
    elif kind == "mask":
        x0, y0 = (int(v) for v in _points(shape)[0])
        try:
            m = cv2.imdecode(np.frombuffer(base64.b64decode(shape.get("mask") or b"", validate=True), np.uint8), 0)
        except (binascii.Error, TypeError, ValueError):
            m = None
        if m is None:
            raise ValueError("field 'mask' is not a base64 PNG")
        ys, xs = slice(max(y0, 0), min(y0 + m.shape[0], h)), slice(max(x0, 0), min(x0 + m.shape[1], w))
        out[ys, xs] = m[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0] > 0
    else:
        raise ValueError(f"unknown shape_type {kind!r}")
    return out.astype(bool)


def objects(data: dict, h: int, w: int) -> tuple:
    """(ids (A,) int64, compressed RLE strings (A,), labels [str] (A,), bad [(shape index, message)]).
    Each shape is encoded as it is drawn (one dense mask in memory at a time); the shapes of one
    object are merged as RLEs (pycocotools). Objects without a pixel are left out."""
    groups: dict = {}  # (label, group_id), or ("", shape index) when group_id is null -> [RLE]
    labels: dict = {}
    bad = []
    for i, shape in enumerate(data["shapes"]):
        if not isinstance(shape, dict):
            bad.append((i, f"shape {i} is not an object"))
            continue
        try:
            m = shape_mask(shape, h, w)
        except ValueError as exc:
            bad.append((i, f"shape {i} ({shape.get('label')!r}): {exc}"))
            continue
        if m is None:
            continue
        gid = shape.get("group_id")
        key = (str(shape.get("label")), gid) if gid is not None else ("", i)
        groups.setdefault(key, []).append(mask_utils.encode(np.asfortranarray(m.astype(np.uint8))))
        labels.setdefault(key, str(shape.get("label")))
    ids, counts, names = [], [], []
    for key, parts in groups.items():
        merged = mask_utils.merge(parts) if len(parts) > 1 else parts[0]
        if mask_utils.area(merged) > 0:
            ids.append(len(ids) + 1)
            counts.append(merged["counts"].decode("ascii"))
            names.append(labels[key])
    return np.array(ids, np.int64), counts, names, bad
