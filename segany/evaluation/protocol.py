"""Interactive single-point evaluation (SAM paper, section 7.1 / appendix D.1).

Per GT mask: click 1 at the mask centre (the distance-transform maximum; or uniform in the mask
with ``first_click="random"``), each later click on the largest error of the previous prediction,
placed by RITM's rule (clicks.Clicker: strict FN > FP, no pixel clicked twice). After click 1 the model gives
3 masks (multimask): *default* = the one with the highest predicted IoU, *oracle* = the one
with the best IoU with the GT. From click 2 on it gives the single-mask output (token 0),
with the previous round's low-res logits as mask prompt (``use_prev_mask``); *oracle* is
then the best of all 4 output tokens.

IoUs are measured in the resized input frame (longest side S) inside the unpadded region:
low-res logits -> bilinear to S x S -> cropped to ``input_size``.
All masks of an image go through the decoder together; only the click placement (distance
transforms) runs per mask on the CPU.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from segany.evaluation.boundary import boundary_dilation, boundary_iou, spurious_components
from segany.evaluation.clicks import Clicker, random_click
from segany.evaluation.metrics import mask_iou
from segany.modeling.constants import PAD, POS


@dataclass
class ClickProtocol:
    clicks: Sequence[int] = (1, 2, 3, 5, 9)  # report mIoU after these numbers of clicks
    multimask_first: bool = True
    use_prev_mask: bool = True
    first_click: str = "center"  # "center" (distance-transform maximum) | "random" (uniform in the mask)
    seed: int = 0  # random first clicks: drawn from (seed, image id)
    boundary_dilation_ratio: Optional[float] = None  # set: boundary IoU and spurious components too (boundary.py)
    hq_output: str = "sum"  # HQ-SAM models: every SAM token's mask + the HQ mask ("sum", the release predictor's
    # default) or the HQ mask alone ("hq", its hq_token_only); default / oracle still chosen by SAM's tokens

    def __post_init__(self):
        self.clicks = tuple(int(c) for c in self.clicks)
        if not self.clicks or min(self.clicks) < 1:
            raise ValueError(f"evaluation.clicks={list(self.clicks)}: positive click counts")
        if self.first_click not in ("center", "random"):
            raise ValueError(f"first_click={self.first_click!r}: expected 'center' or 'random'")
        if self.hq_output not in ("sum", "hq"):
            raise ValueError(f"hq_output={self.hq_output!r}: expected 'sum' or 'hq'")


def _inside(batch: dict, S: int, device) -> torch.Tensor:
    """(B, S, S) bool: the unpadded image region of each image."""
    h, w = batch["input_size"][:, 0], batch["input_size"][:, 1]
    ar = torch.arange(S, device=device)
    return (ar[None, :, None] < h[:, None, None].to(device)) & (ar[None, None, :] < w[:, None, None].to(device))


@torch.no_grad()
def interactive_eval(
    model,
    batch: dict,
    protocol: ClickProtocol,
    embeddings: Optional[torch.Tensor] = None,
    interm: Optional[torch.Tensor] = None,
) -> dict:
    """Run the protocol on one batch. Returns {"iou": {k: [per-mask IoU]}, "iou_oracle":
    {k: [...]}, "count": valid masks, "pred_first": (B, N, S, S) bool default prediction
    after click 1, "clicks_first": (B, N, 2) (x, y) of click 1}; with boundary_dilation_ratio also
    the default prediction's "biou" and "spurious" {k: [...]} (boundary.py), on the masks of the IoU,
    d from each image's input-frame diagonal. An HQ-SAM model also needs its encoder's early
    features ``interm`` with given embeddings (computed here otherwise); see hq_output."""
    masks, valid = batch["masks"], batch["valid"]
    B, N, S, _ = masks.shape
    R, dev = B * N, masks.device
    hq = bool(getattr(model, "hq", False))
    if embeddings is None:
        emb, interm = (
            model.encode_image(batch["image"], return_interm=True)
            if hq
            else (model.image_encoder(batch["image"]), None)
        )
    else:
        emb = embeddings
    if hq and interm is None:
        raise ValueError(
            "interactive_eval: an HQ-SAM model needs interm (the encoder's early features) with embeddings"
        )
    hq_feat = model.mask_decoder.hq_features(emb, interm) if hq else None  # (B, C/8, 4h, 4w)
    pe = model.prompt_encoder.get_dense_pe()
    inside = _inside(batch, S, dev)[:, None].expand(B, N, S, S).reshape(R, S, S)
    gt = masks.reshape(R, S, S) & inside
    v = valid.reshape(R)
    gt_np, v_np = gt.cpu().numpy(), v.cpu().numpy()

    coords = torch.zeros(R, 0, 2, device=dev)
    labels = torch.zeros(R, 0, dtype=torch.long, device=dev)
    mask_in, pred_np = None, None
    ids = batch.get("image_id") or [str(b) for b in range(B)]
    rngs = (
        [np.random.default_rng([protocol.seed, zlib.crc32(str(ids[r // N]).encode()), r % N]) for r in range(R)]
        if protocol.first_click == "random"
        else None
    )
    clickers = {r: Clicker(gt_np[r]) for r in np.nonzero(v_np)[0]}  # RITM's clicker: no pixel clicked twice
    res = {
        "iou": {k: [] for k in protocol.clicks},
        "iou_oracle": {k: [] for k in protocol.clicks},
        "count": int(v_np.sum()),
    }
    if protocol.boundary_dilation_ratio is not None:
        res.update(biou={k: [] for k in protocol.clicks}, spurious={k: [] for k in protocol.clicks})
        ratio = protocol.boundary_dilation_ratio
        dil = torch.tensor([boundary_dilation(h, w, ratio) for h, w in batch["input_size"].tolist()])
        dil = dil.repeat_interleave(N)  # (R,): d of each mask's image
    for k in range(1, max(protocol.clicks) + 1):
        c = np.zeros((R, 2), np.float32)
        l = np.full((R,), PAD, np.int64)
        for r in np.nonzero(v_np)[0]:  # click placement: a distance transform per mask, on the CPU
            if k > 1:
                click = clickers[r].click(pred_np[r])
            elif not gt_np[r].any():
                click = None
            elif protocol.first_click == "center":
                click = clickers[r].click()
            else:
                click = random_click(gt_np[r], rngs[r])
                clickers[r].add(*click, POS)
            if click is not None:
                c[r] = (click[1], click[0])
                l[r] = POS if k == 1 else click[2]
        coords = torch.cat((coords, torch.from_numpy(c).to(dev)[:, None]), 1)
        labels = torch.cat((labels, torch.from_numpy(l).to(dev)[:, None]), 1)

        sparse, dense = model.prompt_encoder(points=(coords, labels), boxes=None, masks=mask_in)
        if hq_feat is None:
            low, iou_pred = model.mask_decoder.predict_masks(emb, pe, sparse, dense)  # (R, 4, 4h, 4w), (R, 4)
        else:  # (R, 5, ..): SAM's 4 tokens + HQ -> 4 candidates, each SAM's + HQ's (or HQ's alone)
            low, iou_pred = model.mask_decoder.predict_masks(emb, pe, sparse, dense, hq_features=hq_feat)
            sam_low, hq_low = low[:, :4], low[:, 4:]
            low = sam_low + hq_low if protocol.hq_output == "sum" else hq_low.expand_as(sam_low)
        low, iou_pred = low.float(), iou_pred.float()
        true_iou = torch.stack(
            [
                mask_iou(_full(low[:, i : i + 1], S).masked_fill(~inside[:, None], -1.0), gt[:, None])[:, 0]
                for i in range(low.shape[1])
            ],
            1,
        )  # (R, 4)
        if k == 1 and protocol.multimask_first:
            default = iou_pred[:, 1:].argmax(1) + 1
            oracle = true_iou[:, 1:].max(1).values
        else:
            default = torch.zeros(R, dtype=torch.long, device=dev)
            oracle = true_iou.max(1).values
        rows = torch.arange(R, device=dev)
        chosen_low = low[rows, default][:, None]  # (R, 1, 4h, 4w)
        pred = (_full(chosen_low, S)[:, 0] > 0) & inside
        pred_np = pred.cpu().numpy()
        if protocol.use_prev_mask:
            mask_in = chosen_low
        if k == 1:
            res["pred_first"] = pred.view(B, N, S, S)
            res["clicks_first"] = coords[:, 0].view(B, N, 2)
        if k in res["iou"]:
            res["iou"][k] = true_iou[rows, default][v].tolist()
            res["iou_oracle"][k] = oracle[v].tolist()
            if "biou" in res:
                res["biou"][k] = boundary_iou(pred[v], gt[v], dil[v.cpu()]).tolist()
                res["spurious"][k] = spurious_components(pred_np[v_np], gt_np[v_np]).tolist()
    return res


def _full(low: torch.Tensor, S: int) -> torch.Tensor:
    return F.interpolate(low, (S, S), mode="bilinear", align_corners=False)


# COCOeval's area ranges (pycocotools cocoeval.Params.areaRng): [lo, hi) in original-image pixels
AREA_BINS = {"small": (0.0, 32.0**2), "medium": (32.0**2, 96.0**2), "large": (96.0**2, float("inf"))}


def original_areas(batch: dict) -> torch.Tensor:
    """(B, N) float: each GT mask's area in original-image pixels, estimated as its area in
    the input frame times (original h * w) / (input h * w). The batch carries the masks at
    the input size only, so a mask thinner than the resize factor is counted as resized."""
    orig, inp = batch["original_size"].double(), batch["input_size"].double()
    scale = orig.prod(1) / inp.prod(1)  # (B,)
    return batch["masks"].sum((2, 3)).double() * scale[:, None]


def _mean(v) -> float:
    return float(np.mean(v)) if len(v) else float("nan")


# per-mask list (interactive_eval's keys) -> the metric of its mean
METRICS = {"iou": "miou", "iou_oracle": "miou_oracle", "biou": "mbiou", "spurious": "spurious"}


def summarize(per_mask: dict) -> dict:
    """Concatenated per-mask lists {"iou": {k: [...]}, "iou_oracle": ..., optionally "biou",
    "spurious" and "area": [...]} -> metrics: miou@k, miou_oracle@k (mbiou@k, spurious@k: the
    means, METRICS), num_masks, and with areas the same per COCO area bin (AREA_BINS):
    miou@k_small, miou_oracle@k_small, num_masks_small, ..."""
    lists = {name: per_mask[key] for key, name in METRICS.items() if key in per_mask}  # name -> {k: [...]}
    out = {f"{name}@{k}": _mean(v) for name, per_k in lists.items() for k, v in per_k.items()}
    out["num_masks"] = len(next(iter(per_mask["iou"].values()), []))
    if "area" in per_mask:
        area = np.asarray(per_mask["area"], float)
        for bin_name, (lo, hi) in AREA_BINS.items():
            sel = (area >= lo) & (area < hi)
            for name, per_k in lists.items():
                out.update({f"{name}@{k}_{bin_name}": _mean(np.asarray(v, float)[sel]) for k, v in per_k.items()})
            out[f"num_masks_{bin_name}"] = int(sel.sum())
    return out
