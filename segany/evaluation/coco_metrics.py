"""Mask AR and AP with pycocotools' COCOeval (the reference implementation).

Ground truth and detections are plain lists (json-serialisable, so ranks can write them to
part files): images ``{id, height, width}``, annotations ``{image_id, segmentation (COCO
RLE, str counts), area, bbox, iscrowd, category_id}``, detections ``{image_id,
segmentation, score, category_id}``. Annotation ids are renumbered 1..n.
"""

from __future__ import annotations

import contextlib
import io
from typing import Sequence

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

AREAS = ("all", "small", "medium", "large")  # COCOeval's areaRngLbl order


def coco_ground_truth(images: list, anns: list, categories: Sequence[int] = ()) -> COCO:
    cats = sorted({int(a["category_id"]) for a in anns} | {int(c) for c in categories}) or [1]
    data = {
        "images": [{"id": int(i["id"]), "height": int(i["height"]), "width": int(i["width"])} for i in images],
        "annotations": [dict(a, id=n + 1) for n, a in enumerate(anns)],
        "categories": [{"id": c, "name": str(c)} for c in cats],
    }
    ids = [i["id"] for i in data["images"]]
    if len(set(ids)) != len(ids):
        raise ValueError("ground truth: two images share an image id")
    gt = COCO()
    gt.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def _run(gt: COCO, dets: list, use_cats: bool, max_dets: Sequence[int]) -> COCOeval:
    unknown = {int(d["image_id"]) for d in dets} - set(gt.imgs)
    if unknown:
        raise ValueError(
            f"detections refer to {len(unknown)} image ids not in the ground truth, e.g. {sorted(unknown)[0]}"
        )
    with contextlib.redirect_stdout(io.StringIO()):
        res = gt.loadRes([dict(d) for d in dets])
        ev = COCOeval(gt, res, "segm")
        ev.params.useCats = int(use_cats)
        ev.params.maxDets = [int(m) for m in max_dets]
        ev.evaluate()
        ev.accumulate()
    return ev


def mask_ar(gt: COCO, dets: list, max_dets: Sequence[int] = (10, 100, 1000)) -> dict:
    """Class-agnostic mask average recall (IoU .50:.05:.95): AR@k and AR_{small,medium,large}@k
    for every k in max_dets (detections ranked by score within each image). NaN where an area
    range holds no ground truth."""
    out = {}
    if not dets:
        for k in max_dets:
            for a in AREAS:
                out[_ar_key(a, k)] = 0.0
        return out
    ev = _run(gt, dets, use_cats=False, max_dets=max_dets)
    recall = ev.eval["recall"]  # (T iou thresholds, K categories, A areas, M maxDets)
    for m, k in enumerate(max_dets):
        for a, name in enumerate(AREAS):
            r = recall[:, :, a, m]
            r = r[r > -1]
            out[_ar_key(name, k)] = float(r.mean()) if r.size else float("nan")
    return out


def _ar_key(area: str, k: int) -> str:
    return f"AR@{k}" if area == "all" else f"AR_{area[0]}@{k}"


def mask_ap(gt: COCO, dets: list) -> dict:
    """COCO mask AP (per category, then averaged): AP, AP50, AP75, APs, APm, APl (maxDets 100)."""
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    if not dets:
        return {n: 0.0 for n in names}
    ev = _run(gt, dets, use_cats=True, max_dets=(1, 10, 100))
    with contextlib.redirect_stdout(io.StringIO()):
        ev.summarize()
    return {n: (float(v) if v > -1 else float("nan")) for n, v in zip(names, ev.stats[:6])}
