"""The ``instances`` task (SAM paper §7.4): segment a detector's boxes and score the masks
with COCO mask AP. Each box is the prompt of a first pass; one refinement pass then feeds
the best mask's low-res logits back together with the same box (single-mask output). The
detector's score and category are kept.

Detections: a COCO results json (``[{image_id, category_id, bbox [x, y, w, h], score}, ...]``,
e.g. ViTDet-H's on COCO/LVIS val), or ``gt_boxes`` — the ground-truth boxes with score 1, an
oracle detector for data without one (the synthetic demo).

With instances.boundary_dilation_ratio, also the boundary IoU (boundary.py) and the spurious
components of the masks matched to a ground-truth object, per COCO size bin of the object's area.
Matching as COCOeval's at IoU 0.5: per image and category, detections by decreasing score each
take the unmatched non-crowd object of highest mask IoU >= 0.5. This is the mean boundary IoU of
true positives at the original resolution (the masks COCOeval scores), not the paper's Boundary AP.
"""

from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import torch
from pycocotools import mask as mask_utils

from segany.data.decode import decode_mask
from segany.evaluation.boundary import boundary_dilation, boundary_iou, spurious_components
from segany.evaluation.coco_metrics import coco_ground_truth, mask_ap
from segany.evaluation.protocol import AREA_BINS
from segany.evaluation.registry import ImageTask, register
from segany.evaluation.sources import EvalImage
from segany.inference import SamPredictor
from segany.inference.amg_utils import coco_encode_rle, mask_to_rle_pytorch
from segany.utils.io import read_json


def load_detections(path: str, min_score: float = 0.0) -> dict:
    """COCO results json -> {image_id: [{bbox, score, category_id}, ...]}; errors name the file
    and the entry."""
    data = read_json(path, "instances.detections file")
    if not isinstance(data, list):
        raise ValueError(f"{path}: a COCO results file is a list of detections")
    out: dict = {}
    for i, d in enumerate(data):
        if not isinstance(d, dict):
            raise ValueError(f"{path}: entry {i} is not an object")
        for key in ("image_id", "bbox", "score"):
            if key not in d:
                raise ValueError(f"{path}: entry {i} has no '{key}'")
        if not (isinstance(d["bbox"], list) and len(d["bbox"]) == 4):
            raise ValueError(f"{path}: entry {i}: bbox must be [x, y, w, h]")
        if float(d["score"]) < min_score:
            continue
        out.setdefault(int(d["image_id"]), []).append(
            {
                "bbox": [float(v) for v in d["bbox"]],
                "score": float(d["score"]),
                "category_id": int(d.get("category_id", 1)),
            }
        )
    return out


def gt_box_detections(ev: EvalImage) -> list:
    """The oracle detector: every non-crowd GT box, score 1."""
    return [
        {"bbox": a["bbox"], "score": 1.0, "category_id": a["category_id"]} for a in ev.anns if not a.get("iscrowd", 0)
    ]


@torch.no_grad()
def segment_boxes(
    predictor, boxes_xyxy: np.ndarray, refine: bool = True, multimask_first: bool = False, batch: int = 64
) -> np.ndarray:
    """Masks of boxes (N, 4) xyxy in original-image pixels, on the predictor's current image.
    Pass 1: box prompt (multimask_first: 3 outputs, the highest predicted IoU is the best);
    pass 2 (refine): the same box + pass 1's best low-res logits as mask prompt, single output.
    Returns (N, H, W) bool."""
    H, W = predictor.original_size
    out = np.zeros((len(boxes_xyxy), H, W), bool)
    for s in range(0, len(boxes_xyxy), batch):
        b = torch.as_tensor(boxes_xyxy[s : s + batch], dtype=torch.float, device=predictor.device)
        b = predictor.transform.apply_boxes_torch(b, (H, W))  # (n, 4) input frame
        masks, iou, low = predictor.predict_torch(None, None, boxes=b, multimask_output=multimask_first)
        best = iou.argmax(1)  # (n,)
        rows = torch.arange(len(b), device=b.device)
        masks, low = masks[rows, best], low[rows, best][:, None]  # (n, H, W), (n, 1, h, w)
        if refine:
            masks, _, _ = predictor.predict_torch(None, None, boxes=b, mask_input=low, multimask_output=False)
            masks = masks[:, 0]
        out[s : s + len(b)] = masks.cpu().numpy()
    return out


def match_detections(dets: list, anns: list, iou_threshold: float = 0.5) -> list:
    """COCOeval's greedy matching at one IoU on one image: dets [{segmentation, score,
    category_id}], anns (COCO annotations) -> [(det index, ann index)]: by decreasing score, each
    detection takes the unmatched non-crowd annotation of its category with the highest mask IoU
    >= iou_threshold."""
    objects = [j for j, a in enumerate(anns) if not a.get("iscrowd", 0)]
    if not dets or not objects:
        return []
    ious = mask_utils.iou(
        [d["segmentation"] for d in dets], [anns[j]["segmentation"] for j in objects], [0] * len(objects)
    )  # (D, G)
    taken, pairs = set(), []
    for i in sorted(range(len(dets)), key=lambda i: -dets[i]["score"]):  # stable, as COCOeval's mergesort
        best, best_iou = None, iou_threshold
        for g, j in enumerate(objects):
            same = anns[j]["category_id"] == dets[i]["category_id"]
            if same and j not in taken and ious[i, g] >= best_iou:
                best, best_iou = j, ious[i, g]
        if best is not None:
            taken.add(best)
            pairs.append((i, best))
    return pairs


def matched_scores(masks: np.ndarray, dets: list, anns: list, dilation: int) -> dict:
    """(N, H, W) bool masks of dets on one image -> {"biou", "spurious", "area"}: a list entry per
    matched (detection, annotation) pair (match_detections), area = the annotation's."""
    pairs = match_detections(dets, anns)
    if not pairs:
        return {"biou": [], "spurious": [], "area": []}
    pred = torch.from_numpy(masks[[i for i, _ in pairs]])
    gt = torch.from_numpy(np.stack([decode_mask(anns[j]["segmentation"]) for _, j in pairs]))
    area = [float(anns[j].get("area", gt[n].sum())) for n, (_, j) in enumerate(pairs)]
    return {
        "biou": boundary_iou(pred, gt, dilation).tolist(),
        "spurious": spurious_components(pred, gt).tolist(),
        "area": area,
    }


def instances_part(
    predictor,
    images: Iterable[EvalImage],
    detections: Optional[dict],
    refine: bool = True,
    multimask_first: bool = False,
    dilation_ratio: Optional[float] = None,
) -> dict:
    """{"images", "gt", "dets"} of a rank's share, and with dilation_ratio "matched"
    (matched_scores' lists over the share); detections None = gt_boxes."""
    out = {"images": [], "gt": [], "dets": []}
    if dilation_ratio is not None:
        out["matched"] = {"biou": [], "spurious": [], "area": []}
    for ev in images:
        h, w = ev.size
        out["images"].append({"id": ev.image_id, "height": h, "width": w, "key": ev.key})
        out["gt"] += [dict(a, image_id=ev.image_id) for a in ev.anns]
        dets = gt_box_detections(ev) if detections is None else detections.get(ev.image_id, [])
        if not dets:
            continue
        xywh = np.array([d["bbox"] for d in dets], np.float64)
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        predictor.set_image(ev.image)
        masks = segment_boxes(predictor, xyxy, refine, multimask_first)
        rles = [coco_encode_rle(r) for r in mask_to_rle_pytorch(torch.from_numpy(masks))]
        scored = [
            {"image_id": ev.image_id, "category_id": d["category_id"], "score": d["score"], "segmentation": r}
            for d, r in zip(dets, rles)
        ]
        out["dets"] += scored
        if dilation_ratio is not None:
            m = matched_scores(masks, scored, ev.anns, boundary_dilation(h, w, dilation_ratio))
            for key, v in m.items():
                out["matched"][key] += v
    predictor.reset_image()
    return out


def instances_merge(parts: list) -> dict:
    images = [i for p in parts for i in p["images"]]
    gt = coco_ground_truth(
        images, [a for p in parts for a in p["gt"]], categories=[d["category_id"] for p in parts for d in p["dets"]]
    )
    out = mask_ap(gt, [d for p in parts for d in p["dets"]])
    out["num_images"] = len(images)
    out["num_detections"] = int(sum(len(p["dets"]) for p in parts))
    if all("matched" in p for p in parts):
        matched = {k: [v for p in parts for v in p["matched"][k]] for k in ("biou", "spurious", "area")}
        out.update(matched_summary(matched))
    return out


def matched_summary(matched: dict) -> dict:
    """{"biou", "spurious", "area"} lists of the matched pairs -> mbiou, spurious (means) and
    num_matched, overall and per COCO area bin of the annotation (mbiou_small, ...)."""
    area = np.asarray(matched["area"], float)
    out = {}
    for suffix, (lo, hi) in {"": (0.0, float("inf")), **{f"_{n}": r for n, r in AREA_BINS.items()}}.items():
        sel = (area >= lo) & (area < hi)
        for key, name in (("biou", "mbiou"), ("spurious", "spurious")):
            v = np.asarray(matched[key], float)[sel]
            out[f"{name}{suffix}"] = float(v.mean()) if v.size else float("nan")
        out[f"num_matched{suffix}"] = int(sel.sum())
    return out


@register("instances")
class InstancesTask(ImageTask):
    """cfg.instances: detections (a COCO results json, read once for all datasets, or gt_boxes),
    min_score, refine, multimask_first, boundary_dilation_ratio (null: no boundary IoU of the matches)."""

    every_image = True  # COCOeval's image set: a detection on an image without ground truth is a false positive
    description = (
        "Boxes from {detections} prompt SAM (refine={refine}: a second pass, best mask + box); mask AP by COCOeval. "
        "mBIoU: mean boundary IoU (Cheng et al. 2021; d = boundary_dilation_ratio ({boundary_dilation_ratio}) x the "
        "image diagonal) of the masks matched to an object at mask IoU >= 0.5 (COCOeval's greedy rule; not Boundary "
        "AP), by the object's area; spurious: their 8-connected components that miss the object."
    )
    columns = (
        "AP",
        "AP50",
        "AP75",
        "APs",
        "APm",
        "APl",
        "mbiou",
        "mbiou_(small|medium|large)",
        "spurious",
        "num_matched",
        "num_images",
    )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._detections = None

    def part_images(self, dataset: str, images: Iterable[EvalImage]) -> dict:
        p = self.cfg.instances
        if p.detections != "gt_boxes" and self._detections is None:
            self._detections = load_detections(p.detections, p.min_score)
        ratio = p.get("boundary_dilation_ratio")
        return instances_part(SamPredictor(self.model), images, self._detections, p.refine, p.multimask_first, ratio)

    def merge(self, parts: list) -> dict:
        return instances_merge(parts)
