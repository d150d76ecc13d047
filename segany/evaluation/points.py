"""The ``points`` task: interactive single-point mIoU (protocol.py) per dataset, sharded
over ranks, and the mean over datasets (the paper averages its 23 datasets this way)."""

from __future__ import annotations

import torch

from segany.evaluation.protocol import ClickProtocol, interactive_eval, original_areas, summarize
from segany.evaluation.registry import EvalTask, register
from segany.evaluation.report import Plot
from segany.utils.cli import RENAMED


@torch.no_grad()
def points_part(
    model, dm, protocol: ClickProtocol, device, rank: int = 0, world: int = 1, max_batches=None, references=None
) -> dict:
    """Per-mask IoUs of this rank's share of the datamodule's validation split and the masks'
    areas in original-image pixels (protocol.original_areas): {"iou": {"k": [...]},
    "iou_oracle": {"k": [...]}, "area": [...], "num_images": n} (json-safe keys), with the
    protocol's boundary_dilation_ratio also "biou" and "spurious" {"k": [...]}, and with
    references (name -> model, run on the same batches) their {"iou", "iou_oracle"} under
    "references". A crowd region (COCO iscrowd=1, a RITM set's ignore band) is never a target:
    a datamodule that would batch them as masks (include_crowd=true) is refused."""
    if getattr(getattr(dm.val_dataset, "cfg", None), "include_crowd", False):
        raise ValueError(
            f"points: {type(dm).__name__} has include_crowd=true, which makes crowd regions (groups of objects, "
            "ignored by COCOeval) click targets; evaluate with include_crowd=false"
        )
    loader = dm.val_dataloader()
    dm.val_dataset.set_topology(rank, world)  # the loader iterates the dataset lazily
    models = {"model": model, **(references or {})}
    keys = ("iou", "iou_oracle") + (("biou", "spurious") if protocol.boundary_dilation_ratio is not None else ())
    per_mask = {n: {key: {str(k): [] for k in protocol.clicks} for key in keys} for n in models}
    areas, images = [], 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        for name, m in models.items():
            res = interactive_eval(m, batch, protocol)
            for key in keys:
                for k in protocol.clicks:
                    per_mask[name][key][str(k)] += res[key][k]
        areas += original_areas(batch)[batch["valid"]].tolist()  # the order of res's lists
        images += batch["image"].shape[0]
    out = dict(per_mask.pop("model"), area=areas, num_images=images)
    return dict(out, references=per_mask) if per_mask else out


def points_merge(parts: list) -> dict:
    """Rank parts of one dataset -> {miou@k, miou_oracle@k, num_masks, num_images}, and per
    area bin (miou@k_small, ..., num_masks_small, ...) when the parts carry areas, and
    mbiou@k, spurious@k (per bin too) when they carry "biou" (protocol.summarize); the parts'
    references (points_part) the same under "references": {name: metrics}."""
    keys = list(parts[0]["iou"])
    names = ("iou", "iou_oracle") + (("biou", "spurious") if all("biou" in p for p in parts) else ())
    merged = {name: {int(k): [v for p in parts for v in p[name][k]] for k in keys} for name in names}
    if all("area" in p for p in parts):
        merged["area"] = [a for p in parts for a in p["area"]]
    out = summarize(merged)
    out["num_images"] = int(sum(p["num_images"] for p in parts))
    refs = {
        n: points_merge([{**p["references"][n], **{k: p[k] for k in ("area", "num_images") if k in p}} for p in parts])
        for n in parts[0].get("references", {})
    }
    return dict(out, references=refs) if refs else out


@register("points")
class PointsTask(EvalTask):
    """cfg.points: clicks, multimask_first, use_prev_mask, first_click, boundary_dilation_ratio (null:
    no boundary IoU / spurious components), baselines ([untrained]: the
    model's architecture, freshly initialised); batches of the datamodule's validation loader (its
    own workers), cfg.max_batches per rank."""

    num_workers = None
    description = (
        "Interactive single-point mIoU: click 1 at the mask centre (first_click={first_click}), then on the "
        "largest error; default = most confident of 3 masks, oracle = best. By size: COCO's area bins "
        "(small < 32^2, medium < 96^2, large) of the GT mask's area in original-image pixels (input-frame "
        "area x original / input size); the table shows them at 1 click. mBIoU: boundary IoU (Cheng et al. 2021) of "
        "the default mask, d = boundary_dilation_ratio ({boundary_dilation_ratio}) x the input frame's diagonal; "
        "spurious: its 8-connected components that miss the GT mask, per mask."
    )
    columns = (
        r"miou@\d+",
        r"miou_oracle@\d+",
        "num_masks",
        "miou@1_(small|medium|large)",
        "num_masks_(small|medium|large)",
        r"mbiou@\d+",
        "mbiou@1_(small|medium|large)",
        "spurious@1",
        "spurious@1_(small|medium|large)",
    )
    plots = (
        Plot("points_miou_vs_clicks.png", "number of points", "mIoU", y=r"miou@(\d+)", oracle=r"miou_oracle@(\d+)"),
    )

    def __init__(self, cfg, *args, **kwargs):
        # the settings once at the top level of evaluate.yaml (utils.cli.RENAMED): a callback's
        # settings={clicks: ...} would otherwise be silently ignored
        moved = [k for k in cfg if RENAMED.get(k) == f"points.{k}"]
        if moved:
            raise ValueError(f"{moved[0]}: the points task's settings are under points: (points.{moved[0]}=...)")
        super().__init__(cfg, *args, **kwargs)

    def protocol(self) -> ClickProtocol:
        p = self.cfg.points
        return ClickProtocol(
            clicks=p.clicks,
            multimask_first=p.multimask_first,
            use_prev_mask=p.use_prev_mask,
            first_click=p.first_click,
            seed=self.cfg.seed,
            boundary_dilation_ratio=p.get("boundary_dilation_ratio"),
            hq_output=p.get("hq_output", "sum"),
        )

    def references(self) -> dict:
        """points.baselines -> name -> model: [untrained] (the model's architecture, freshly initialised)."""
        names = list(self.cfg.points.baselines or [])
        if names not in ([], ["untrained"]):
            raise ValueError(f"points.baselines={names}: the points task has one, untrained (grabcut: noc.baselines)")
        return {n: self.untrained_model() for n in names}

    def part(self, dataset: str, dm, rank: int, world: int) -> dict:
        refs = self.references()
        return points_part(self.model, dm, self.protocol(), self.device, rank, world, self.cfg.max_batches, refs)

    def merge(self, parts: list) -> dict:
        return points_merge(parts)
