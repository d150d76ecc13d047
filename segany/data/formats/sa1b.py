"""The SA-1B json of one image, built in one place (synthetic scenes, the COCO converter, the
data engine and test data all write it here).

    {"image": {"image_id", "width", "height", "file_name"},
     "annotations": [{"id", "segmentation": {"size": [h, w], "counts": str}, "bbox": [x, y, w, h],
                      "area", then e.g. "predicted_iou", "stability_score", "crop_box", "point_coords",
                      or COCO's "iscrowd", "category_id"}, ...]}

Keys in the order of the SA-1B release's description; plain Python numbers, so that json.dumps
writes them as such.
"""

from __future__ import annotations

from typing import Union

import numpy as np
from pycocotools import mask as mask_utils

_FLOATS = ("predicted_iou", "stability_score")  # SA-1B's float fields; boxes / points below
_BOXES = ("crop_box",)


def rle(mask: np.ndarray) -> dict:
    """(h, w) bool mask -> compressed COCO RLE {"size": [h, w], "counts": str}."""
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")}


def _rle(segmentation: Union[np.ndarray, dict]) -> dict:
    if isinstance(segmentation, np.ndarray):
        return rle(segmentation)
    counts = segmentation["counts"]
    return {
        "size": [int(v) for v in segmentation["size"]],
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
    }


def _number(v):
    """int stays int and float stays float (a COCO polygon's area is fractional), as Python types."""
    return float(v) if isinstance(v, (float, np.floating)) else int(v)


def annotation(ann_id: int, segmentation: Union[np.ndarray, dict], bbox=None, area=None, **fields) -> dict:
    """One SA-1B annotation. segmentation: an (h, w) bool mask or a compressed RLE dict
    (counts str or bytes). bbox (xywh) and area: from the RLE (pycocotools) unless given.
    fields: the rest, in the order given; SA-1B's predicted_iou / stability_score become floats,
    crop_box and point_coords lists of floats."""
    seg = _rle(segmentation)
    enc = None
    if bbox is None or area is None:
        enc = {"size": seg["size"], "counts": seg["counts"].encode("ascii")}
    ann = {
        "id": int(ann_id),
        "segmentation": seg,
        "bbox": [float(v) for v in (mask_utils.toBbox(enc) if bbox is None else bbox)],
        "area": int(mask_utils.area(enc)) if area is None else _number(area),
    }
    for k, v in fields.items():
        if k in _FLOATS:
            v = float(v)
        elif k in _BOXES:
            v = [float(x) for x in v]
        elif k == "point_coords":
            v = [[float(x) for x in p] for p in v]
        ann[k] = v
    return ann


def image_ext(data: bytes) -> str:
    """The member extension of encoded image bytes in a shard: "png" (PNG signature) or "jpg"."""
    return "png" if data[:4] == b"\x89PNG" else "jpg"


def image_json(image_id: int, height: int, width: int, file_name: str, annotations: list) -> dict:
    """The json of one image: its record and its annotations (built by `annotation`)."""
    return {
        "image": {"image_id": int(image_id), "width": int(width), "height": int(height), "file_name": str(file_name)},
        "annotations": annotations,
    }
