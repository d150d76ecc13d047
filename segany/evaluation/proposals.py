"""The ``proposals`` task (SAM paper §7.3, appendix D.4): the automatic mask generator as an
object-proposal method — a 64x64 point grid, box NMS at IoU 0.9, no predicted-IoU or
stability filter, the top 1000 masks by the mean of predicted IoU and stability score —
scored by class-agnostic mask AR@10/100/1000 (all, small, medium, large) with COCOeval.

Any generator with the official ``generate(image) -> records`` API (``output_mode=
"coco_rle"``) works, so the official package's generator can be scored the same way.
"""

from __future__ import annotations

from typing import Iterable

from segany.evaluation.coco_metrics import coco_ground_truth, mask_ar
from segany.evaluation.registry import ImageTask, register
from segany.evaluation.report import Plot
from segany.evaluation.sources import EvalImage
from segany.inference import SamAutomaticMaskGenerator


def proposal_generator(
    model, points_per_side: int = 64, nms_thresh: float = 0.9, points_per_batch: int = 64, **overrides
) -> SamAutomaticMaskGenerator:
    kw = dict(
        points_per_side=points_per_side,
        points_per_batch=points_per_batch,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        box_nms_thresh=nms_thresh,
        output_mode="coco_rle",
    )
    kw.update(overrides)
    return SamAutomaticMaskGenerator(model, **kw)


def rank_proposals(records: list, top_k: int = 1000) -> list:
    """records (generator output) -> the top_k by (predicted_iou + stability_score) / 2, with
    that mean as "score"; ties keep the generator's order."""
    scored = [dict(r, score=0.5 * (float(r["predicted_iou"]) + float(r["stability_score"]))) for r in records]
    order = sorted(range(len(scored)), key=lambda i: -scored[i]["score"])
    return [scored[i] for i in order[:top_k]]


def proposals_part(generator, images: Iterable[EvalImage], top_k: int = 1000) -> dict:
    """{"images", "gt", "dets"} of a rank's share, json-safe (COCO RLE with str counts)."""
    out = {"images": [], "gt": [], "dets": []}
    for ev in images:
        h, w = ev.size
        out["images"].append({"id": ev.image_id, "height": h, "width": w, "key": ev.key})
        out["gt"] += [dict(a, image_id=ev.image_id, category_id=1) for a in ev.anns]
        for r in rank_proposals(generator.generate(ev.image), top_k):
            seg = r["segmentation"]
            if not isinstance(seg, dict) or not isinstance(seg.get("counts"), str):
                raise ValueError("proposal generator: set output_mode='coco_rle'")
            out["dets"].append({"image_id": ev.image_id, "category_id": 1, "segmentation": seg, "score": r["score"]})
    return out


def proposals_merge(parts: list, max_dets=(10, 100, 1000)) -> dict:
    images = [i for p in parts for i in p["images"]]
    gt = coco_ground_truth(images, [a for p in parts for a in p["gt"]])
    out = mask_ar(gt, [d for p in parts for d in p["dets"]], max_dets)
    out["num_images"] = len(images)
    out["num_proposals"] = int(sum(len(p["dets"]) for p in parts))
    return out


@register("proposals")
class ProposalsTask(ImageTask):
    """cfg.proposals: points_per_side, points_per_batch, nms_thresh, top_k, max_dets."""

    description = (
        "Mask generator as proposals ({points_per_side}x{points_per_side} grid, NMS {nms_thresh}, no quality "
        "filter, top {top_k} by mean(pred IoU, stability)); class-agnostic mask AR by COCOeval."
    )
    columns = (r"AR@\d+", "AR_s@1000", "AR_m@1000", "AR_l@1000", "num_images")
    plots = (Plot("proposals_ar.png", "proposals per image", "mask AR", y=r"AR@(\d+)", log_x=True),)

    def part_images(self, dataset: str, images: Iterable[EvalImage]) -> dict:
        p = self.cfg.proposals
        gen = proposal_generator(self.model, p.points_per_side, p.nms_thresh, p.points_per_batch)
        return proposals_part(gen, images, p.top_k)

    def merge(self, parts: list) -> dict:
        return proposals_merge(parts, tuple(self.cfg.proposals.max_dets))
