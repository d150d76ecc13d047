"""COCO / LVIS instance files: loading with checks that name the file and field, image
paths (COCO `file_name` or LVIS `coco_url`), and any segmentation as a compressed RLE string
(through pycocotools: polygons with fewer than 3 points dropped, the rest merged;
uncompressed RLE of `iscrowd` regions; compressed RLE)."""

from __future__ import annotations

import contextlib
import io
import os

from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from segany.utils.io import read_json


def load_coco(path: str) -> COCO:
    """Load and check an instance json; errors name the file and the field."""
    data = read_json(path, "annotation file")
    for field in ("images", "annotations"):
        if not isinstance(data.get(field) if isinstance(data, dict) else None, list):
            raise ValueError(f"{path}: missing list field '{field}' (not a COCO/LVIS instance file)")
    for i, img in enumerate(data["images"]):
        for field in ("id", "height", "width"):
            if not isinstance(img.get(field), int):
                raise ValueError(f"{path}: images[{i}] has no integer '{field}'")
        if not img.get("file_name") and not img.get("coco_url"):
            raise ValueError(f"{path}: images[{i}] has neither 'file_name' nor 'coco_url'")
    for i, ann in enumerate(data["annotations"]):
        for field in ("id", "image_id"):
            if not isinstance(ann.get(field), int):
                raise ValueError(f"{path}: annotations[{i}] has no integer '{field}'")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    unknown = [a["id"] for a in data["annotations"] if a["image_id"] not in coco.imgs]
    if unknown:
        raise ValueError(
            f"{path}: {len(unknown)} annotations refer to images that are not listed (e.g. annotation {unknown[0]})"
        )
    return coco


def image_path(images_dir: str, info: dict) -> str:
    """File of an image entry: file_name (COCO), else from coco_url (LVIS)."""
    names = []
    if info.get("file_name"):
        names.append(info["file_name"])
    if info.get("coco_url"):
        parts = info["coco_url"].rstrip("/").split("/")
        names += [parts[-1], "/".join(parts[-2:])]
    if not names:
        raise ValueError(f"image {info.get('id')} has neither file_name nor coco_url")
    for name in names:
        if os.path.isfile(os.path.join(images_dir, name)):
            return os.path.join(images_dir, name)
    return os.path.join(images_dir, names[0])


def rle_counts(coco: COCO, ann: dict) -> str:
    """Compressed RLE string of an annotation's segmentation; ValueError says why not."""
    info = coco.imgs[ann["image_id"]]
    h, w = info["height"], info["width"]
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        parts = [p for p in seg if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
        if not parts:
            raise ValueError("polygon with fewer than 3 points")
        out = mask_utils.merge(mask_utils.frPyObjects(parts, h, w))
    elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if list(seg["size"]) != [h, w]:
            raise ValueError(f"segmentation.size {seg['size']} but the image is {h}x{w}")
        if isinstance(seg["counts"], list):
            if sum(seg["counts"]) != h * w:
                raise ValueError(f"uncompressed RLE covers {sum(seg['counts'])} pixels, not {h * w}")
            out = mask_utils.frPyObjects(seg, h, w)
        else:
            out = seg
    else:
        raise ValueError("no polygon or RLE segmentation")
    counts = out["counts"]
    return counts.decode("ascii") if isinstance(counts, bytes) else str(counts)
