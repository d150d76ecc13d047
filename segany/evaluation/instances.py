"""The ``instances`` task (SAM paper §7.4): segment a detector's boxes and score the masks
with COCO mask AP. Each box is the prompt of a first pass; one refinement pass then feeds
the best mask's low-res logits back together with the same box (single-mask output). The
detector's score and category are kept.

Detections: a COCO results json (``[{image_id, category_id, bbox [x, y, w, h], score}, ...]``,
e.g. ViTDet-H's on COCO/LVIS val), or ``gt_boxes`` — the ground-truth boxes with score 1, an
oracle detector for data without one (the synthetic demo).
"""

from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import torch

from segany.evaluation.coco_metrics import coco_ground_truth, mask_ap
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


def instances_part(
    predictor,
    images: Iterable[EvalImage],
    detections: Optional[dict],
    refine: bool = True,
    multimask_first: bool = False,
) -> dict:
    """{"images", "gt", "dets"} of a rank's share; detections None = gt_boxes."""
    out = {"images": [], "gt": [], "dets": []}
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
        out["dets"] += [
            {"image_id": ev.image_id, "category_id": d["category_id"], "score": d["score"], "segmentation": r}
            for d, r in zip(dets, rles)
        ]
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
    return out


@register("instances")
class InstancesTask(ImageTask):
    """cfg.instances: detections (a COCO results json, read once for all datasets, or gt_boxes),
    min_score, refine, multimask_first."""

    every_image = True  # COCOeval's image set: a detection on an image without ground truth is a false positive
    description = (
        "Boxes from {detections} prompt SAM (refine={refine}: a second pass, best mask + box); mask AP by COCOeval."
    )
    columns = ("AP", "AP50", "AP75", "APs", "APm", "APl", "num_images")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._detections = None

    def part_images(self, dataset: str, images: Iterable[EvalImage]) -> dict:
        p = self.cfg.instances
        if p.detections != "gt_boxes" and self._detections is None:
            self._detections = load_detections(p.detections, p.min_score)
        return instances_part(SamPredictor(self.model), images, self._detections, p.refine, p.multimask_first)

    def merge(self, parts: list) -> dict:
        return instances_merge(parts)
