"""The ``noc`` task: the interactive benchmark of RITM (isegm/inference/evaluation.py, utils.py) —
number of clicks to reach an IoU (NoC@80/85/90), the objects that need all max_clicks (NoF), and
mIoU after k clicks, k = 1..max_clicks — with SAM as the model, prompted as the release's
predictor is used interactively.

Per object, in the image's stored resolution: clicks placed by RITM's clicker (clicks.Clicker: the
first at the distance-transform maximum of the object, then on the larger error region, no pixel
twice, the ignore region excluded); after each click SamPredictor.predict gets all clicks so far,
the previous click's low-res logits of the chosen mask as mask_input, and multimask_output on the
first click only; the chosen mask is the one of highest predicted IoU (the only one after click 1).
IoU as RITM's get_iou: intersection and union outside the ignore region. Every object gets all
max_clicks clicks (RITM's mIoU analysis mode); NoC does not depend on it. With
noc.boundary_dilation_ratio, after each click also the boundary IoU (boundary.py; the inner
boundaries of the whole masks, counted outside the ignore region as the IoU) and the spurious
components (of the prediction outside the ignore region, 8-connected, sharing no pixel with the object).

NoC and NoF exactly as RITM's compute_noc_metric: an object's NoC@t is the first click whose IoU
is >= t, or max_clicks when none is; NoF@t counts the objects whose NoC@t equals max_clicks (so an
object reaching t exactly at the last click counts as a failure, as in RITM's ">=20@90%" column).

The ignore region of an image is the union of its crowd annotations (RITM-layout sets: the ignore
band; COCO: the iscrowd regions, which COCOeval ignores too).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

from segany.data.decode import decode_mask
from segany.evaluation.boundary import boundary_dilation, inner_boundary, spurious_components
from segany.evaluation.clicks import Clicker
from segany.evaluation.grabcut import GrabCutSegmenter
from segany.evaluation.registry import ImageTask, register
from segany.evaluation.report import Plot
from segany.evaluation.sources import EvalImage
from segany.inference import SamPredictor


def iou_outside(pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray) -> float:
    """RITM's get_iou: IoU of (H, W) bool pred and gt counting only pixels outside ignore."""
    keep = ~ignore
    inter = np.count_nonzero(pred & gt & keep)
    union = np.count_nonzero((pred | gt) & keep)
    return inter / union if union else 1.0


class SamSegmenter:
    """SamPredictor as a segmenter of object_ious: all clicks so far, the previous click's low-res
    logits of the chosen mask as mask_input (the state), multimask_output on click 1 only."""

    def __init__(self, predictor):
        self.predictor = predictor

    def set_image(self, image: np.ndarray) -> None:
        self.predictor.set_image(image)

    def reset_image(self) -> None:
        self.predictor.reset_image()

    def predict(self, clicks: Sequence, low=None) -> tuple:
        """clicks [(y, x, label)], low (1, 4h, 4w) logits or None -> ((H, W) bool mask, its logits)."""
        yx = np.array([c[:2] for c in clicks], np.float32)
        labels = np.array([c[2] for c in clicks], np.int64)
        multi = len(clicks) == 1
        masks, scores, lows = self.predictor.predict(yx[:, ::-1], labels, mask_input=low, multimask_output=multi)
        best = int(scores.argmax())
        return masks[best], lows[best][None]


@torch.no_grad()
def object_scores(segmenter, gt: np.ndarray, ignore: np.ndarray, max_clicks: int, dilation=None) -> dict:
    """After each of max_clicks clicks on one object of the segmenter's current image: {"iou": [...]},
    and with dilation (boundary IoU's d in pixels) "biou" and "spurious" [...]; the segmenter's
    predict(clicks, state) -> (prediction, state) gets state None at click 1."""
    clicker = Clicker(gt, ignore)
    pred, state = None, None
    out = {"iou": []} if dilation is None else {"iou": [], "biou": [], "spurious": []}
    gt_boundary = None if dilation is None else inner_boundary(torch.from_numpy(gt), dilation).numpy()
    for _ in range(max_clicks):
        clicker.click(pred)
        pred, state = segmenter.predict(clicker.clicks, state)
        out["iou"].append(iou_outside(pred, gt, ignore))
        if dilation is not None:
            pred_b = np.asarray(pred, bool)
            boundary = inner_boundary(torch.from_numpy(pred_b), dilation).numpy()
            out["biou"].append(iou_outside(boundary, gt_boundary, ignore))
            out["spurious"].append(int(spurious_components(pred_b & ~ignore, gt)[0]))
    return out


def object_ious(segmenter, gt: np.ndarray, ignore: np.ndarray, max_clicks: int) -> list:
    """IoU after each of max_clicks clicks on one object (object_scores' "iou")."""
    return object_scores(segmenter, gt, ignore, max_clicks)["iou"]


def noc_part(segmenters: dict, images: Iterable[EvalImage], max_clicks: int, dilation_ratio=None) -> dict:
    """Every segmenter (name -> segmenter) on the same objects -> {"ious": {name: [[IoU after
    click 1..max_clicks] per object]}, "keys": [image key per object], "num_images"}; with
    dilation_ratio (boundary IoU's d / image diagonal) also "bious" and "spurious" like "ious"."""
    fine = ("bious", "spurious") if dilation_ratio is not None else ()
    out = {"ious": {name: [] for name in segmenters}, "keys": [], "num_images": 0}
    out.update({key: {name: [] for name in segmenters} for key in fine})
    for ev in images:
        objects = [a for a in ev.anns if not a.get("iscrowd", 0)]
        ignore = np.zeros(ev.size, bool)
        for a in ev.anns:
            if a.get("iscrowd", 0):
                ignore |= decode_mask(a["segmentation"])
        out["num_images"] += 1
        if not objects:
            continue
        gts = [decode_mask(a["segmentation"]) for a in objects]
        d = boundary_dilation(*ev.size, dilation_ratio) if fine else None
        for name, seg in segmenters.items():
            seg.set_image(ev.image)
            scores = [object_scores(seg, gt, ignore, max_clicks, d) for gt in gts]
            for key, src in (("ious", "iou"), ("bious", "biou"), ("spurious", "spurious"))[: 1 + len(fine)]:
                out[key][name] += [s[src] for s in scores]
        out["keys"] += [ev.key] * len(objects)
    for seg in segmenters.values():
        seg.reset_image()
    return out


def noc_metrics(ious: np.ndarray, thresholds: Sequence[float], max_clicks: int, bious=None, spurious=None) -> dict:
    """(N, K) IoU per object and click -> {NoC@t, NoF@t, miou@k, num_objects} (RITM's rules);
    with (N, K) boundary IoUs and spurious component counts also mbiou@k and spurious@k (means)."""
    out = {}
    ious = np.asarray(ious, np.float64).reshape(-1, max_clicks)
    for t in thresholds:
        reached = ious >= t
        noc = np.where(reached.any(1), reached.argmax(1) + 1, max_clicks)
        name = f"{round(100 * t)}"
        out[f"NoC@{name}"] = float(noc.mean()) if len(noc) else float("nan")
        out[f"NoF@{name}"] = int((noc == max_clicks).sum())
    for k in range(1, max_clicks + 1):
        out[f"miou@{k}"] = float(ious[:, k - 1].mean()) if len(ious) else float("nan")
    for name, v in (("mbiou", bious), ("spurious", spurious)):
        if v is not None:
            v = np.asarray(v, np.float64).reshape(-1, max_clicks)
            for k in range(1, max_clicks + 1):
                out[f"{name}@{k}"] = float(v[:, k - 1].mean()) if len(v) else float("nan")
    out["num_objects"] = int(len(ious))
    return out


BASELINES = ("grabcut", "untrained")  # noc.baselines: the reference methods


def noc_settings(p) -> tuple:
    """cfg.noc -> (max_clicks, iou_thresholds), checked."""
    max_clicks = int(p.max_clicks)
    if max_clicks < 1:
        raise ValueError(f"noc.max_clicks={max_clicks}: at least 1")
    thresholds = [float(t) for t in p.iou_thresholds]
    if not thresholds or not all(0 < t <= 1 for t in thresholds):
        raise ValueError(f"noc.iou_thresholds={thresholds}: IoUs in (0, 1]")
    return max_clicks, thresholds


@register("noc")
class NocTask(ImageTask):
    """cfg.noc: max_clicks, iou_thresholds, boundary_dilation_ratio (null: no boundary IoU / spurious
    components), baselines (grabcut: cfg.noc.grabcut; untrained: the model's architecture, freshly
    initialised); cfg.max_images bounds the images per dataset."""

    description = (
        "RITM's interactive benchmark: NoC@t for t in {iou_thresholds} (clicks to reach the IoU, {max_clicks} "
        "when never), NoF (objects at {max_clicks}), mIoU after k clicks; RITM's clicker, previous low-res "
        "logits as mask prompt, multimask on click 1 only; IoU at the image's resolution outside the ignore region. "
        "mBIoU: boundary IoU (Cheng et al. 2021; d = boundary_dilation_ratio ({boundary_dilation_ratio}) x the image "
        "diagonal) likewise; spurious: the prediction's 8-connected components that miss the object."
    )
    columns = (
        r"NoC@\d+",
        r"NoF@\d+",
        "miou@(1|2|3|5|10|20)",
        "mbiou@(1|2|3|5|10|20)",
        "spurious@(1|5|20)",
        "num_objects",
        "num_images",
    )
    plots = (Plot("noc_miou_vs_clicks.png", "number of clicks", "mIoU", y=r"miou@(\d+)"),)

    def _baselines(self) -> dict:
        """noc.baselines -> name -> segmenter, checked."""
        names = list(self.cfg.noc.get("baselines") or [])
        bad = [n for n in names if n not in BASELINES] + [n for i, n in enumerate(names) if n in names[:i]]
        if bad:
            raise ValueError(f"noc.baselines={names}: {bad[0]!r} is unknown or repeated; choose from {list(BASELINES)}")
        out = {}
        for name in names:
            if name == "grabcut":
                out[name] = GrabCutSegmenter(**(self.cfg.noc.get("grabcut") or {}), seed=self.cfg.seed)
            else:
                out[name] = SamSegmenter(SamPredictor(self.untrained_model()))
        return out

    def part_images(self, dataset: str, images: Iterable[EvalImage]) -> dict:
        segmenters = {"model": SamSegmenter(SamPredictor(self.model)), **self._baselines()}
        ratio = self.cfg.noc.get("boundary_dilation_ratio")
        return noc_part(segmenters, images, noc_settings(self.cfg.noc)[0], ratio)

    def merge(self, parts: list) -> dict:
        max_clicks, thresholds = noc_settings(self.cfg.noc)

        def metrics(name: str) -> dict:
            ious = [r for p in parts for r in p["ious"][name]]
            fine = [k for k in ("bious", "spurious") if all(k in p for p in parts)]
            fine = {k: [r for p in parts for r in p[k][name]] for k in fine}
            out = noc_metrics(np.array(ious).reshape(-1, max_clicks), thresholds, max_clicks, **fine)
            out["num_images"] = int(sum(p["num_images"] for p in parts))
            return out

        out = metrics("model")
        refs = {name: metrics(name) for name in parts[0]["ious"] if name != "model"}
        return dict(out, references=refs) if refs else out
