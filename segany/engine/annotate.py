"""What the data engine does to one image.

AutoAnnotator — the fully automatic stage (paper §4, appendix B): the mask generator with the
SA-1B settings: a 32x32 point grid on the image plus 2 crop layers (2x2 crops with 16x16
grids, 4x4 crops with 8x8), predicted IoU >= 0.88, stability >= 0.95 (offset 1), box NMS 0.7
within and across crops, holes and islands < 100 px removed; masks covering >= 95% of the
image dropped, and empty ones (only possible with the quality filters off).

SemiAnnotator — the semi-automatic stage: the image's confident masks (existing annotations
with predicted IoU and stability at least the thresholds; annotations without scores, e.g.
human ones, count as confident) are kept, the point grid is restricted to the pixels none of
them covers, and new masks that lie mostly (> max_overlap of their area) on already
annotated pixels are dropped; the rest are added.

Annotations are SA-1B's (`segany.data.formats.sa1b.annotation`): id, segmentation (COCO RLE,
str counts), bbox (xywh), area, predicted_iou, stability_score, crop_box (xywh), point_coords ([[x, y]]).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from segany.data.formats.sa1b import annotation
from segany.inference import SamAutomaticMaskGenerator
from segany.inference.amg_utils import build_point_grid

SA1B_SETTINGS = dict(
    points_per_side=32,
    points_per_batch=64,
    pred_iou_thresh=0.88,
    stability_score_thresh=0.95,
    stability_score_offset=1.0,
    box_nms_thresh=0.7,
    crop_n_layers=2,
    crop_nms_thresh=0.7,
    crop_overlap_ratio=512 / 1500,
    crop_n_points_downscale_factor=2,
    min_mask_region_area=100,
)
MAX_AREA_FRAC = 0.95
ID_STRIDE = 100_000  # annotation id = image_id * ID_STRIDE + index in the image


def _annotations(records: list, image_id: int, start: int = 0) -> list:
    """SA-1B annotations of mask-generator records (output_mode="coco_rle"), with ids
    image_id * ID_STRIDE + start + index."""
    if start + len(records) > ID_STRIDE:
        raise ValueError(f"image {image_id}: more than {ID_STRIDE} masks; annotation ids would collide")
    return [
        annotation(
            int(image_id) * ID_STRIDE + start + j,
            r["segmentation"],
            bbox=r["bbox"],
            area=int(r["area"]),
            predicted_iou=r["predicted_iou"],
            stability_score=r["stability_score"],
            crop_box=r["crop_box"],
            point_coords=r["point_coords"],
        )
        for j, r in enumerate(records)
    ]


class AutoAnnotator:
    """annotate(image (H, W, 3) uint8 RGB, image_id) -> SA-1B annotations."""

    def __init__(self, model, max_area_frac: float = MAX_AREA_FRAC, **settings):
        kw = dict(SA1B_SETTINGS)
        kw.update(settings)
        self.settings = kw
        self.max_area_frac = float(max_area_frac)
        self.generator = SamAutomaticMaskGenerator(model, output_mode="coco_rle", **kw)

    def __call__(self, image: np.ndarray, image_id: int, meta: Optional[dict] = None) -> list:
        h, w = image.shape[:2]
        recs = [r for r in self.generator.generate(image) if 0 < r["area"] < self.max_area_frac * h * w]
        return _annotations(recs, image_id)


def _confident(ann: dict, min_iou: float, min_stability: float) -> bool:
    def ok(name, thr):
        v = ann.get(name)
        return not isinstance(v, (int, float)) or math.isnan(v) or v >= thr

    return ok("predicted_iou", min_iou) and ok("stability_score", min_stability)


class SemiAnnotator:
    """annotate(image, image_id, meta with the existing annotations) -> confident existing +
    new annotations (new ids continue after the largest index of the given ones)."""

    def __init__(
        self,
        model,
        min_predicted_iou: float = 0.88,
        min_stability: float = 0.95,
        max_overlap: float = 0.5,
        max_area_frac: float = MAX_AREA_FRAC,
        points_per_side: int = 32,
        **settings,
    ):
        kw = {k: v for k, v in SA1B_SETTINGS.items() if not k.startswith("crop_") and k != "points_per_side"}
        kw.update(settings)
        self.settings, self.model = kw, model
        self.min_iou, self.min_stability = float(min_predicted_iou), float(min_stability)
        self.max_overlap, self.max_area_frac = float(max_overlap), float(max_area_frac)
        self.grid = build_point_grid(points_per_side)  # (P, 2) xy in [0, 1]

    def unannotated_points(self, covered: np.ndarray) -> np.ndarray:
        """Grid points (normalised xy) that fall on pixels no kept mask covers."""
        h, w = covered.shape
        xy = np.minimum((self.grid * [w, h]).astype(np.int64), [w - 1, h - 1])
        return self.grid[~covered[xy[:, 1], xy[:, 0]]]

    def __call__(self, image: np.ndarray, image_id: int, meta: Optional[dict] = None) -> list:
        from segany.data.decode import decode_mask

        h, w = image.shape[:2]
        existing = [a for a in (meta or {}).get("annotations", []) if _confident(a, self.min_iou, self.min_stability)]
        covered = np.zeros((h, w), bool)
        for a in existing:
            covered |= decode_mask(a["segmentation"])
        points = self.unannotated_points(covered)
        new = []
        if len(points):
            gen = SamAutomaticMaskGenerator(
                self.model, points_per_side=None, point_grids=[points], output_mode="coco_rle", **self.settings
            )
            for r in gen.generate(image):
                m = decode_mask(r["segmentation"])
                area = int(m.sum())
                if area == 0 or area >= self.max_area_frac * h * w:
                    continue
                if (m & covered).sum() > self.max_overlap * area:
                    continue
                new.append(r)
        given = (meta or {}).get("annotations", [])  # ids of dropped annotations are not reused either
        start = 1 + max((int(a["id"]) % ID_STRIDE for a in given if isinstance(a.get("id"), int)), default=-1)
        return existing + _annotations(new, image_id, start)
