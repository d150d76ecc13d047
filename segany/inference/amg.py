"""Automatic ("segment everything") mask generation.

Drop-in replacement for ``segment_anything.SamAutomaticMaskGenerator``: same
constructor options, same ``generate`` output records.

Pipeline per crop (layer 0 = the whole image, then 2x2, 4x4, ... crops):
  embed crop -> prompt a point grid in batches (3 masks per point) -> drop masks with
  low predicted IoU (before any upsampling) -> stability score and box from the upsampled
  logits, chunk by chunk -> drop unstable masks and those touching an inner crop edge ->
  box NMS inside the crop -> upsample, threshold and RLE-encode the survivors only.
Across crops: box NMS preferring masks from smaller crops. Optionally remove small
holes/islands (OpenCV) and re-run NMS.

The release upsamples every decoded mask to the image size, thresholds and RLE-encodes all
that pass the filters, then runs NMS. Here the masks stay low-res (4h x 4w logits) until
the crop's NMS; every number that decides a mask's fate (predicted IoU, stability score,
box) is computed from the same upsampled logits as the release's, so the kept masks and
their records are the release's.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torchvision.ops import batched_nms, box_area

from segany.inference.amg_utils import (
    area_from_rle,
    batch_iterator,
    batched_logits_to_box,
    batched_mask_to_box,
    box_xyxy_to_xywh,
    build_all_layer_point_grids,
    calculate_stability_score,
    coco_encode_rle,
    generate_crop_boxes,
    is_box_near_crop_edge,
    mask_to_rle_pytorch,
    remove_small_regions,
    uncrop_boxes_xyxy,
    uncrop_masks,
    uncrop_points,
)
from segany.inference.predictor import CHUNK_BYTES, SamPredictor

_OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


@dataclass
class _Proposals:
    """Surviving mask proposals, all aligned along dim 0 (N), image frame."""

    rles: List[Dict[str, Any]]  # N uncompressed RLEs, (H, W) image frame
    boxes: torch.Tensor  # (N, 4) int64 xyxy, inclusive right/bottom
    iou_preds: torch.Tensor  # (N,) float32
    points: torch.Tensor  # (N, 2) float64 xy px, the prompt of each mask
    stability_score: torch.Tensor  # (N,) float32
    crop_boxes: torch.Tensor  # (N, 4) int64 xyxy of the crop each mask came from

    def __len__(self) -> int:
        return len(self.rles)

    def take(self, idx: torch.Tensor) -> "_Proposals":
        """Subset by an index tensor (keeps its order)."""
        idx = idx.cpu().long()
        return _Proposals(
            rles=[self.rles[i] for i in idx.tolist()],
            **{
                f.name: getattr(self, f.name)[idx.to(getattr(self, f.name).device)]
                for f in fields(self)
                if f.name != "rles"
            },
        )

    @staticmethod
    def cat(parts: Sequence["_Proposals"]) -> "_Proposals":
        return _Proposals(
            rles=[r for p in parts for r in p.rles],
            **{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(_Proposals) if f.name != "rles"},
        )


class SamAutomaticMaskGenerator:
    """Generate masks for a whole image by prompting SAM with a grid of points.

    Arguments (defaults are the release's, tuned for ViT-H):
      model: the ``Sam`` to use.
      points_per_side: grid points per image side (layer 0); None if ``point_grids`` given.
      points_per_batch: points decoded at once.
      pred_iou_thresh: keep masks whose predicted IoU is above this (0 disables).
      stability_score_thresh: keep masks whose stability score is >= this (0 disables).
      stability_score_offset: logit offset used for the stability score.
      box_nms_thresh: box IoU threshold of the NMS within a crop.
      crop_n_layers: extra crop layers; layer i has (2**i)**2 crops.
      crop_nms_thresh: box IoU threshold of the NMS across crops.
      crop_overlap_ratio: overlap of first-layer crops as a fraction of the short side.
      crop_n_points_downscale_factor: layer i uses points_per_side / factor**i points.
      point_grids: explicit per-layer grids, each (P, 2) in [0, 1] xy.
      min_mask_region_area: if > 0, remove holes/islands smaller than this (OpenCV).
      output_mode: "binary_mask" | "uncompressed_rle" | "coco_rle" (pycocotools).
      precision (keyword, segany only): "fp32" (the release's masks), "bf16" (encoder and
        decoder under torch.autocast to bfloat16, on the model's device type) or "auto" (bf16
        where the device has bf16 units).
    """

    def __init__(
        self,
        model: Any,
        points_per_side: Optional[int] = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: Optional[List[np.ndarray]] = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        *,
        precision: str = "fp32",
    ) -> None:
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("Exactly one of points_per_side or point_grids must be provided.")
        if points_per_side is not None:
            self.point_grids = build_all_layer_point_grids(
                points_per_side, crop_n_layers, crop_n_points_downscale_factor
            )
        else:
            self.point_grids = list(point_grids)  # type: ignore[arg-type]
        if len(self.point_grids) < crop_n_layers + 1:
            raise ValueError(f"need {crop_n_layers + 1} point grids (one per crop layer), got {len(self.point_grids)}")
        if output_mode not in _OUTPUT_MODES:
            raise ValueError(f"Unknown output_mode {output_mode!r}; expected one of {_OUTPUT_MODES}.")
        # fail at construction, not after minutes of decoding, if a dependency is missing
        if output_mode == "coco_rle":
            import pycocotools.mask  # type: ignore # noqa: F401
        if min_mask_region_area > 0:
            import cv2  # type: ignore # noqa: F401

        self.predictor = SamPredictor(model, precision=precision)
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode

    # ------------------------------------------------------------------ public

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> List[Dict[str, Any]]:
        """Masks for an (H, W, 3) uint8 image (in the model's ``image_format``).

        Returns one record per mask: ``segmentation`` ((H, W) bool array or RLE dict,
        by ``output_mode``), ``area`` (int), ``bbox`` ([x, y, w, h]), ``predicted_iou``,
        ``point_coords`` ([[x, y]]), ``stability_score``, ``crop_box`` ([x, y, w, h]).
        """
        props = self._generate_masks(image)
        if self.min_mask_region_area > 0:
            props = self.postprocess_small_regions(
                props, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh)
            )

        if self.output_mode == "coco_rle":
            segmentations = [coco_encode_rle(r) for r in props.rles]
        elif self.output_mode == "binary_mask":
            from segany.data.decode import decode_mask  # segany.data pulls in Lightning: only when used

            segmentations = [decode_mask(r) for r in props.rles]
        else:
            segmentations = props.rles

        bboxes = box_xyxy_to_xywh(props.boxes).tolist()
        crop_boxes = box_xyxy_to_xywh(props.crop_boxes).tolist()
        ious = props.iou_preds.tolist()
        stabilities = props.stability_score.tolist()
        points = props.points.tolist()
        return [
            {
                "segmentation": segmentations[i],
                "area": area_from_rle(props.rles[i]),
                "bbox": bboxes[i],
                "predicted_iou": ious[i],
                "point_coords": [points[i]],
                "stability_score": stabilities[i],
                "crop_box": crop_boxes[i],
            }
            for i in range(len(props))
        ]

    # ------------------------------------------------------------------ stages

    def _generate_masks(self, image: np.ndarray) -> _Proposals:
        orig_size = image.shape[:2]
        crop_boxes, layer_idxs = generate_crop_boxes(orig_size, self.crop_n_layers, self.crop_overlap_ratio)
        props = _Proposals.cat(
            [self._process_crop(image, box, layer, orig_size) for box, layer in zip(crop_boxes, layer_idxs)]
        )
        if len(crop_boxes) > 1 and len(props):
            # duplicates across crops: prefer the mask from the smaller crop
            # class-agnostic NMS as the release: batched_nms with one category for all boxes
            scores = (1 / box_area(props.crop_boxes)).to(props.boxes.device)
            one_class = torch.zeros_like(props.boxes[:, 0])
            keep = batched_nms(props.boxes.float(), scores, one_class, self.crop_nms_thresh)
            props = props.take(keep)
        return props

    def _process_crop(
        self, image: np.ndarray, crop_box: List[int], layer: int, orig_size: Tuple[int, ...]
    ) -> _Proposals:
        x0, y0, x1, y1 = crop_box
        crop = image[y0:y1, x0:x1, :]
        crop_size = crop.shape[:2]
        self.predictor.set_image(crop)

        grid = self.point_grids[layer]  # (P, 2) in [0, 1]
        points = grid * np.array([[crop_size[1], crop_size[0]]])  # (P, 2) xy px, crop frame
        parts = [
            self._process_batch(batch, crop_size, crop_box, orig_size)
            for (batch,) in batch_iterator(self.points_per_batch, points)
        ]
        cand = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}  # candidates of the whole crop
        # duplicates within the crop: NMS on the boxes of the full-resolution masks
        keep = batched_nms(
            cand["boxes"].float(), cand["iou_preds"], torch.zeros_like(cand["boxes"][:, 0]), self.box_nms_thresh
        )
        # only the survivors are upsampled once more, thresholded and run-length encoded
        rles = self._encode(cand["low_res"][keep], crop_box, orig_size)
        self.predictor.reset_image()
        n = len(keep)
        return _Proposals(
            rles=rles,
            boxes=uncrop_boxes_xyxy(cand["boxes"][keep], crop_box),
            iou_preds=cand["iou_preds"][keep],
            points=uncrop_points(cand["points"][keep.cpu()], crop_box),
            stability_score=cand["stability_score"][keep],
            crop_boxes=torch.tensor([crop_box], dtype=torch.long).expand(n, 4).clone(),
        )

    def _chunks(self, n: int) -> Iterator[slice]:
        """Slices of up to n masks whose full-resolution logits fit the upsampling budget."""
        h, w = self.predictor.original_size
        step = max(1, CHUNK_BYTES // (4 * (h * w + self.predictor.model.image_encoder.img_size**2)))
        return (slice(s, s + step) for s in range(0, n, step))

    def _process_batch(
        self, points: np.ndarray, crop_size: Tuple[int, ...], crop_box: List[int], orig_size: Tuple[int, ...]
    ) -> Dict[str, torch.Tensor]:
        """Decode one batch of grid points (B, 2) (crop frame px) into the candidates that pass
        the filters, with their masks still as low-res logits (K, 4h, 4w).

        The numbers are the release's: the predicted-IoU filter needs no mask, so only its
        survivors are upsampled (the release upsamples all 3B); the stability score and the box
        come from the upsampled logits, chunk by chunk, without keeping the full-size masks."""
        orig_h, orig_w = orig_size
        pred = self.predictor
        in_points = torch.as_tensor(
            pred.transform.apply_coords(points, crop_size), dtype=torch.float, device=pred.device
        )  # (B, 2) input frame
        in_labels = torch.ones(len(in_points), dtype=torch.int, device=pred.device)  # (B,)
        # masks only for the points with an output above the IoU threshold (the others are never used)
        min_iou = self.pred_iou_thresh if self.pred_iou_thresh > 0.0 else None
        low_res, iou = pred.predict_low_res(
            in_points[:, None, :], in_labels[:, None], multimask_output=True, min_iou=min_iou
        )
        k = low_res.shape[1]  # low_res (B, 3, 4h, 4w) crop frame; iou (B, 3)
        low_res = low_res.flatten(0, 1)  # (B*3, 4h, 4w); row i*3+j = mask j of point i
        iou = iou.flatten(0, 1)  # (B*3,)
        pts = torch.as_tensor(points).repeat_interleave(k, dim=0)  # (B*3, 2) float64

        keep = torch.arange(len(iou), device=iou.device)
        if self.pred_iou_thresh > 0.0:
            keep = keep[iou > self.pred_iou_thresh]
        thresh, offset = pred.model.mask_threshold, self.stability_score_offset
        stability, boxes = [], []
        for sl in self._chunks(len(keep)):
            logits = pred.upsample(low_res[keep[sl], None])[:, 0]  # (c, H, W) crop frame
            stability.append(calculate_stability_score(logits, thresh, offset))
            boxes.append(batched_logits_to_box(logits, thresh))
        stability = torch.cat(stability) if stability else iou.new_zeros(0)  # (K,)
        boxes = torch.cat(boxes) if boxes else torch.zeros((0, 4), dtype=torch.long, device=iou.device)  # (K, 4)
        ok = stability >= self.stability_score_thresh if self.stability_score_thresh > 0.0 else None
        if ok is not None:
            keep, stability, boxes = keep[ok], stability[ok], boxes[ok]
        ok = ~is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_w, orig_h])  # (K,)
        keep, stability, boxes = keep[ok], stability[ok], boxes[ok]
        return {
            "low_res": low_res[keep],
            "boxes": boxes,
            "iou_preds": iou[keep],
            "points": pts[keep.cpu()],
            "stability_score": stability,
        }

    def _encode(self, low_res: torch.Tensor, crop_box: List[int], orig_size: Tuple[int, ...]) -> List[Dict[str, Any]]:
        """Low-res logits (K, 4h, 4w) of the current crop -> K uncompressed RLEs in the image frame."""
        rles: List[Dict[str, Any]] = []
        for sl in self._chunks(len(low_res)):
            masks = self.predictor.upsample(low_res[sl, None])[:, 0] > self.predictor.model.mask_threshold
            rles += mask_to_rle_pytorch(uncrop_masks(masks, crop_box, *orig_size))  # (c, H, W) image frame
        return rles

    @staticmethod
    def postprocess_small_regions(props: _Proposals, min_area: int, nms_thresh: float) -> _Proposals:
        """Fill small holes and remove small islands of every mask, then NMS again,
        preferring masks that needed no change."""
        if len(props) == 0:
            return props
        from segany.data.decode import decode_mask  # segany.data pulls in Lightning: only when used

        cleaned, unchanged = [], []
        for rle in props.rles:
            mask, filled = remove_small_regions(decode_mask(rle), min_area, mode="holes")
            mask, removed = remove_small_regions(mask, min_area, mode="islands")
            cleaned.append(mask)
            unchanged.append(not (filled or removed))
        masks = torch.from_numpy(np.stack(cleaned))  # (N, H, W) bool
        boxes = batched_mask_to_box(masks)  # (N, 4)
        scores = torch.tensor(unchanged, dtype=torch.float)
        keep = batched_nms(boxes.float(), scores, torch.zeros_like(boxes[:, 0]), nms_thresh)

        rles = list(props.rles)
        new_boxes = props.boxes.clone()
        changed = [i for i in keep.tolist() if not unchanged[i]]
        if changed:
            idx = torch.tensor(changed)
            for i, rle in zip(changed, mask_to_rle_pytorch(masks[idx])):
                rles[i] = rle
            new_boxes[idx] = boxes[idx].to(new_boxes)
        props = _Proposals(
            rles=rles,
            boxes=new_boxes,
            iou_preds=props.iou_preds,
            points=props.points,
            stability_score=props.stability_score,
            crop_boxes=props.crop_boxes,
        )
        return props.take(keep)
