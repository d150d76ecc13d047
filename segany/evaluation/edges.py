"""The ``edges`` task (SAM paper §7.2, appendix D.2): zero-shot edge detection.

Prompt a 16x16 grid of foreground points (768 masks, 3 per point), remove redundant masks
with box NMS (no quality filter), then for every kept mask take the Sobel gradient magnitude
of its unthresholded probability map (sigmoid of the logits at image resolution), zeroed
away from the mask's outer boundary; the edge map is the pixel-wise max over masks,
linearly normalised to [0, 1] and thinned by edge NMS. bsds.py scores it as the BSDS500
benchmark does, against a BSDS500 folder's annotators (bsds_data.BSDS500) or, for an instance
dataset, against the boundaries of its masks.

"Outer boundary" here: pixels within one pixel of the mask contour, on either side
(dilation minus erosion with a 3x3 square). Edge NMS follows Dollar & Zitnick's
structured-edge toolbox (edgesNms): the normal direction from the second derivatives of the
triangle-smoothed map (here: the Hessian's eigenvector of largest absolute curvature, which,
unlike the toolbox's atan formula, is also right on exactly axis-aligned edges), suppression
of pixels not above 1.01 x their two neighbours along the normal (bilinear interpolation).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import convolve1d, map_coordinates
from torchvision.ops import nms

from segany.evaluation.registry import ImageTask, register
from segany.evaluation.report import Plot
from segany.evaluation.sources import EvalImage
from segany.inference import SamPredictor
from segany.inference.amg_utils import batched_mask_to_box, build_point_grid

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def sobel_magnitude(prob: torch.Tensor) -> torch.Tensor:
    """(N, H, W) float -> (N, H, W) gradient magnitude (replicate padding)."""
    k = torch.stack([_SOBEL_X, _SOBEL_X.T])[:, None].to(prob)  # (2, 1, 3, 3)
    g = F.conv2d(F.pad(prob[:, None], (1, 1, 1, 1), mode="replicate"), k)  # (N, 2, H, W)
    return g.pow(2).sum(1).sqrt()


def outer_boundary(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool -> (N, H, W) bool: pixels within one pixel of the contour (either side)."""
    m = masks[:, None].float()
    dil = F.max_pool2d(m, 3, 1, 1) > 0
    ero = -F.max_pool2d(-m, 3, 1, 1) > 0
    return (dil & ~ero)[:, 0]


def _tri(x: np.ndarray, r: int = 4) -> np.ndarray:
    """Separable triangle filter of radius r (convTri), replicate borders."""
    k = np.r_[np.arange(1, r + 2), np.arange(r, 0, -1)].astype(np.float64)
    k /= k.sum()
    return convolve1d(convolve1d(x, k, axis=0, mode="nearest"), k, axis=1, mode="nearest")


def edge_nms(E: np.ndarray, radius: int = 1, margin: float = 1.01) -> np.ndarray:
    """Thin an (H, W) edge map: keep pixels at least margin x larger than the map at
    +-1..radius along their normal direction."""
    E = E.astype(np.float64)
    Oy, Ox = np.gradient(_tri(E))
    Oxy, Oxx = np.gradient(Ox)
    Oyy, _ = np.gradient(Oy)
    # normal direction: the Hessian's eigenvector of largest |curvature| (across a ridge, and across
    # its flanks, the curvature is strongest; along the edge it is ~0)
    half_tr, rad = (Oxx + Oyy) / 2, np.hypot((Oxx - Oyy) / 2, Oxy)
    O = 0.5 * np.arctan2(2 * Oxy, Oxx - Oyy) + np.where(np.abs(half_tr + rad) >= np.abs(half_tr - rad), 0, np.pi / 2)
    H, W = E.shape
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    keep = E > 0
    for d in [d for d in range(-radius, radius + 1) if d != 0]:
        nb = map_coordinates(E, [yy + d * np.sin(O), xx + d * np.cos(O)], order=1, mode="nearest")
        keep &= E * margin >= nb
    return np.where(keep, E, 0.0)


@torch.no_grad()
def edge_map(
    predictor,
    image: np.ndarray,
    points_per_side: int = 16,
    nms_thresh: float = 0.7,
    points_per_batch: int = 64,
    thin: bool = True,
) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) float32 edge map in [0, 1]."""
    H, W = image.shape[:2]
    predictor.set_image(image)
    grid = build_point_grid(points_per_side) * np.array([[W, H]])  # (P, 2) xy px
    lows, boxes, scores = [], [], []
    for s in range(0, len(grid), points_per_batch):  # pass 1: boxes for NMS
        pts = predictor.transform.apply_coords(grid[s : s + points_per_batch], (H, W))
        pts = torch.as_tensor(pts, dtype=torch.float, device=predictor.device)[:, None]  # (b, 1, 2)
        labels = torch.ones(pts.shape[:2], dtype=torch.int, device=pts.device)
        masks, iou, low = predictor.predict_torch(pts, labels, multimask_output=True)  # (b, 3, H, W)
        lows.append(low.flatten(0, 1))  # (b*3, h, w)
        boxes.append(batched_mask_to_box(masks.flatten(0, 1)))
        scores.append(iou.flatten())
    low, box, score = torch.cat(lows), torch.cat(boxes), torch.cat(scores)
    nonempty = (box[:, 2] > box[:, 0]) | (box[:, 3] > box[:, 1])
    idx = torch.nonzero(nonempty)[:, 0]
    # class-agnostic NMS over the non-empty masks (E below is their max: kept order is irrelevant)
    keep = idx[nms(box[idx].float(), score[idx], nms_thresh)] if len(idx) else idx
    E = torch.zeros(H, W, device=low.device)
    for s in range(0, len(keep), points_per_batch):  # pass 2: edges of kept masks
        logits = predictor.model.postprocess_masks(
            low[keep[s : s + points_per_batch]][:, None], predictor.input_size, predictor.original_size
        )[:, 0]
        grad = sobel_magnitude(torch.sigmoid(logits)) * outer_boundary(logits > predictor.model.mask_threshold)
        E = torch.maximum(E, grad.amax(0))
    predictor.reset_image()
    E = E.cpu().numpy().astype(np.float64)
    if E.max() > 0:
        E = E / E.max()
    if thin:
        E = edge_nms(E)
        E = E / E.max() if E.max() > 0 else E
    return E.astype(np.float32)


def ground_truth_boundaries(ev: EvalImage) -> list:
    """Boundary maps of an evaluation image from its instance annotations (one map)."""
    from segany.data.decode import decode_mask
    from segany.evaluation.bsds import boundary_map, masks_to_labels

    masks = [decode_mask(a["segmentation"]) for a in ev.anns if not a.get("iscrowd", 0)]
    if not masks:
        return []
    return [boundary_map(masks_to_labels(masks))]


def edges_part(
    predictor, images, points_per_side: int = 16, nms_thresh: float = 0.7, n_thresholds: int = 99, save_dir: str = None
) -> dict:
    """{"keys", "counts" (I, T, 4) as lists} of a rank's share (bsds.image_counts per image);
    with save_dir, each edge map is also written there as an 8-bit PNG."""
    import cv2

    from segany.evaluation.bsds import image_counts, thresholds

    thr = thresholds(n_thresholds)
    out = {"keys": [], "counts": []}
    for ev in images:
        gts = ev.boundaries if ev.boundaries is not None else ground_truth_boundaries(ev)
        if not gts:
            continue
        E = edge_map(predictor, ev.image, points_per_side, nms_thresh)
        if save_dir:
            os.makedirs(save_dir, exist_ok=True)
            cv2.imwrite(os.path.join(save_dir, f"{ev.key}.png"), np.round(E * 255).astype(np.uint8))
        out["keys"].append(ev.key)
        out["counts"].append(image_counts(E, gts, thr).tolist())
    return out


def edges_merge(parts: list) -> dict:
    from segany.evaluation.bsds import summarize

    counts = np.array([c for p in parts for c in p["counts"]], np.int64)  # (I, T, 4)
    if counts.size == 0:
        raise ValueError("edges: no image with ground-truth boundaries")
    out = summarize(counts)
    out["num_images"] = int(counts.shape[0])
    return out


@register("edges")
class EdgesTask(ImageTask):
    """cfg.edges: points_per_side, nms_thresh, n_thresholds, save_maps (PNGs under
    <output_dir>/edge_maps/<dataset>/)."""

    description = (
        "{points_per_side}x{points_per_side} grid, NMS, Sobel on mask probabilities at the outer boundary, max, "
        "normalise, edge NMS; BSDS500 benchmark per threshold (bwmorph thinning, correspondPixels at 0.0075 x "
        "diagonal, collect_eval_bdry's ODS / OIS / AP; R50 as edgesEvalDir)."
    )
    columns = ("ODS", "OIS", "AP", "R50", "num_images")
    plots = (Plot("edges_pr.png", "recall", "precision", curve=("curve", "recall", "precision"), label="ODS"),)

    def part_images(self, dataset: str, images) -> dict:
        p = self.cfg.edges
        save = os.path.join(self.out_dir, "edge_maps", dataset) if p.save_maps else None
        return edges_part(SamPredictor(self.model), images, p.points_per_side, p.nms_thresh, p.n_thresholds, save)

    def merge(self, parts: list) -> dict:
        return edges_merge(parts)
