"""Text-to-mask (SAM paper §7.5) for a model built with the text token (text_embed_dim > 0).

task=crop_prompts  the training-time prompt: each validation mask that has a CLIP crop embedding
                   (data.clip_sidecar) is prompted with that embedding alone. mIoU of the mask
                   with the highest predicted IoU of the 3 outputs (default) and of the best
                   (oracle), in the resized input frame inside the image (as task=points), and
                   a control: the same mask scored against the prediction for the embedding of
                   another mask of the same image (miou_other: high only if the model ignores
                   the embedding's content).
task=text          the inference-time prompt, on COCO/LVIS-format data: for each image and each
                   category with a (non-crowd) instance in it, the phrase text.template with the
                   category's name, CLIP-encoded (text.clip), prompts the model alone; the most
                   confident of the 3 masks is scored, at the original resolution, by its IoU with
                   the best-matching instance of that category. Metrics: miou (mean over
                   image-category pairs), the share of pairs with IoU >= 0.5 (hit@0.5), and the
                   oracle (best of the 3 masks), and mask AP by COCOeval (pycocotools) with
                   that mask as the category's one detection in the image, scored by its
                   predicted IoU: AP/AP50/AP75 over the queried categories only (a category
                   absent from an image is not queried, so no false positive comes from one).
                   Category names: the json's `categories` (text.categories overrides: {id: name}).

Both are outside task=all (they need a text model).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import torch
from pycocotools import mask as mask_utils

from segany.evaluation.coco_metrics import coco_ground_truth, mask_ap
from segany.evaluation.metrics import mask_iou
from segany.evaluation.protocol import _full, _inside
from segany.evaluation.registry import EvalTask, ImageTask, register

log = logging.getLogger("evaluate")


def _need_text(model, task: str) -> None:
    if getattr(model.prompt_encoder, "text_embed_dim", 0) == 0:
        raise ValueError(f"task={task}: the model has no text token (built with text_embed_dim=0)")


def _mean(v) -> float:
    return float(np.mean(v)) if len(v) else float("nan")


@torch.no_grad()
def crop_prompt_ious(model, batch: dict) -> dict:
    """One batch with `clip` / `has_clip` -> per-mask IoUs {"iou", "iou_oracle", "iou_other"}
    (iou_other only for masks whose image has another mask with an embedding)."""
    masks, has = batch["masks"], batch["has_clip"] & batch["valid"]
    B, N, S, _ = masks.shape
    emb = model.image_encoder(batch["image"])
    inside = _inside(batch, S, masks.device)  # (B, S, S)
    gt = masks & inside[:, None]

    def run(text):  # (B, N, D) -> true IoU (B, N, 3) and predicted IoU (B, N, 3) of tokens 1..3
        low, pred = model.decode(emb, text=text, multimask_output=True)  # (B, N, 3, 4h, 4w), (B, N, 3)
        full = _full(low.flatten(0, 1).float(), S).masked_fill(~inside.repeat_interleave(N, 0)[:, None], -1.0)
        iou = mask_iou(full, gt.flatten(0, 1)[:, None].expand_as(full)).view(B, N, 3)
        return iou, pred.float()

    iou, pred = run(batch["clip"])
    top = pred.argmax(-1, keepdim=True)
    out = {"iou": iou.gather(-1, top)[..., 0][has].tolist(), "iou_oracle": iou.max(-1).values[has].tolist()}
    # the control: each mask's slot gets the embedding of the next mask with one in its image
    other = batch["clip"].clone()
    ok = torch.zeros_like(has)
    for b in range(B):
        idx = has[b].nonzero().squeeze(1)
        if len(idx) > 1:
            other[b, idx] = batch["clip"][b, idx.roll(-1)]
            ok[b, idx] = True
    iou_o, pred_o = run(other)
    out["iou_other"] = iou_o.gather(-1, pred_o.argmax(-1, keepdim=True))[..., 0][ok].tolist()
    return out


@register("crop_prompts")
class CropPromptsTask(EvalTask):
    num_workers = None
    in_all = False
    description = (
        "Each mask prompted only by its CLIP crop embedding (the training prompt): mIoU of the most "
        "confident of 3 masks (miou), of the best (miou_oracle), and against the prediction for another "
        "mask's embedding of the same image (miou_other, a control)."
    )
    columns = ("miou", "miou_oracle", "miou_other", "num_masks")

    def part(self, dataset: str, dm, rank: int, world: int) -> dict:
        _need_text(self.model, self.name)
        loader = dm.val_dataloader()
        dm.val_dataset.set_topology(rank, world)
        res = {"iou": [], "iou_oracle": [], "iou_other": [], "num_images": 0}
        for i, batch in enumerate(loader):
            if self.cfg.max_batches is not None and i >= self.cfg.max_batches:
                break
            if "clip" not in batch:
                raise ValueError(
                    f"task=crop_prompts: dataset {dataset} delivers no CLIP embeddings; set data.clip_sidecar "
                    "(and compute them: python -m segany.engine.clip_embeddings)"
                )
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            for k, v in crop_prompt_ious(self.model, batch).items():
                res[k] += v
            res["num_images"] += batch["image"].shape[0]
        return res

    def merge(self, parts: list) -> dict:
        cat = {k: [v for p in parts for v in p[k]] for k in ("iou", "iou_oracle", "iou_other")}
        return {
            "miou": _mean(cat["iou"]),
            "miou_oracle": _mean(cat["iou_oracle"]),
            "miou_other": _mean(cat["iou_other"]),
            "num_masks": len(cat["iou"]),
            "num_images": int(sum(p["num_images"] for p in parts)),
        }


def category_names(dm, override=None) -> dict:
    """id -> name: `override` ({id: name}) or the `categories` of the datamodule's COCO json."""
    if override:
        return {int(k): str(v) for k, v in dict(override).items()}
    path = getattr(dm, "val_annotations", None)
    if not path:
        raise ValueError("task=text: no COCO json with categories (data.val_annotations); set text.categories")
    with open(path) as f:
        cats = json.load(f).get("categories") or []
    if not cats:
        raise ValueError(f"task=text: {path} has no 'categories' list; set text.categories")
    return {int(c["id"]): str(c["name"]) for c in cats}


@register("text")
class TextTask(ImageTask):
    in_all = False
    description = (
        "Per image and category present, the phrase '{template}' with the category name, CLIP-encoded, prompts "
        "the model alone; the most confident of 3 masks is scored by its IoU with the best-matching instance of "
        "that category (original resolution): miou over image-category pairs, hit@0.5 the share with IoU >= 0.5, "
        "miou_oracle the best of the 3 masks; mask AP (COCOeval) with that mask as the category's detection, over "
        "the queried categories."
    )
    columns = ("miou", r"hit@0\.5", "miou_oracle", "AP", "AP50", "num_pairs")

    def part(self, dataset: str, dm, rank: int, world: int) -> dict:
        _need_text(self.model, self.name)
        from segany.inference import SamPredictor
        from segany.modeling.clip import build_clip

        c = self.cfg.text
        config = None
        if c.clip_config:
            with open(c.clip_config) as f:
                config = json.load(f)
        torch.manual_seed(int(c.clip_seed))  # a randomly initialised CLIP: the same on every run
        clip = build_clip(c.clip_model, c.clip_checkpoint, config).to(self.device)
        self.predictor = SamPredictor(self.model, clip=clip)
        self.names = category_names(dm, c.categories)
        return super().part(dataset, dm, rank, world)

    def part_images(self, dataset: str, images) -> dict:
        ious, oracle, n_images = [], [], 0
        out = {"images": [], "gt": [], "dets": []}  # for COCOeval (segany.evaluation.coco_metrics)
        template = str(self.cfg.text.template)
        for ev in images:
            n_images += 1
            by_cat: dict = {}
            for a in ev.anns:
                if not a.get("iscrowd", 0):
                    by_cat.setdefault(int(a["category_id"]), []).append(a["segmentation"])
            if not by_cat:
                continue
            h, w = ev.size
            out["images"].append({"id": ev.image_id, "height": h, "width": w})
            out["gt"] += [dict(a, image_id=ev.image_id) for a in ev.anns]
            self.predictor.set_image(ev.image)
            for cat, segs in sorted(by_cat.items()):
                if cat not in self.names:
                    raise ValueError(f"task=text: category id {cat} of image {ev.key} has no name")
                masks, pred, _ = self.predictor.predict(text=template.format(self.names[cat]))  # (3, H, W)
                rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
                gts = [dict(s, counts=s["counts"].encode()) if isinstance(s["counts"], str) else s for s in segs]
                best = np.asarray(mask_utils.iou(rles, gts, [0] * len(gts))).reshape(3, len(gts)).max(1)  # (3,)
                top = int(np.argmax(pred))
                ious.append(float(best[top]))
                oracle.append(float(best.max()))
                seg = dict(rles[top], counts=rles[top]["counts"].decode())
                out["dets"].append(
                    {"image_id": ev.image_id, "category_id": cat, "score": float(pred[top]), "segmentation": seg}
                )
        return {"iou": ious, "iou_oracle": oracle, "num_images": n_images, **out}

    def merge(self, parts: list) -> dict:
        iou = [v for p in parts for v in p["iou"]]
        images = [i for p in parts for i in p["images"]]
        dets = [d for p in parts for d in p["dets"]]
        ap = mask_ap(coco_ground_truth(images, [a for p in parts for a in p["gt"]]), dets) if images else {}
        return {
            "miou": _mean(iou),
            "miou_oracle": _mean([v for p in parts for v in p["iou_oracle"]]),
            "hit@0.5": _mean([float(v >= 0.5) for v in iou]),
            **{k: ap.get(k, float("nan")) for k in ("AP", "AP50", "AP75")},
            "num_pairs": len(iou),
            "num_images": int(sum(p["num_images"] for p in parts)),
        }
