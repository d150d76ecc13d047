"""evaluate.py's driver: load the model once, then run each requested task on each dataset
(this rank's share), merge the ranks' parts on rank 0 and write the reports.

Tasks: points (interactive mIoU), proposals (mask AR), instances (mask AP from detector
boxes), edges (BSDS-style ODS/OIS/AP); ``task=all`` runs the four.
"""

from __future__ import annotations

import json
import logging
import os
import time

from omegaconf import DictConfig, ListConfig, OmegaConf

from segany.evaluation import report
from segany.evaluation.distributed import fingerprint, gather_parts, write_part
from segany.evaluation.edges import edges_merge, edges_part
from segany.evaluation.instances import instances_merge, instances_part, load_detections
from segany.evaluation.points import mean_over_datasets, points_merge, points_part
from segany.evaluation.proposals import proposal_generator, proposals_merge, proposals_part
from segany.evaluation.protocol import ClickProtocol
from segany.evaluation.sources import build_datamodule, dataset_configs, eval_images
from segany.inference import SamPredictor
from segany.modeling.load import load_model
from segany.utils.dist import pick_device, topology

log = logging.getLogger("evaluate")
TASKS = ("points", "proposals", "instances", "edges")


def tasks_of(cfg: DictConfig) -> list:
    t = cfg.get("task", "points")
    names = list(t) if isinstance(t, (list, ListConfig)) else [str(t)]
    if names == ["all"]:
        return list(TASKS)
    bad = [n for n in names if n not in TASKS]
    if bad:
        raise ValueError(f"task={bad[0]!r}: expected one of {', '.join(TASKS)} or all")
    return names


def output_dir(cfg: DictConfig) -> str:
    if cfg.output_dir:
        return cfg.output_dir
    ck = cfg.ckpt_path
    if ck and not ck.endswith(".pth"):
        return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(ck))), "eval")
    return os.path.join(cfg.paths.root_dir, "eval_untrained" if not ck else "eval")


def _protocol(cfg) -> ClickProtocol:
    return ClickProtocol(
        clicks=tuple(cfg.clicks),
        multimask_first=cfg.multimask_first,
        use_prev_mask=cfg.use_prev_mask,
        first_click=cfg.get("first_click", "center"),
        seed=cfg.seed,
    )


class _Task:
    """part(model, dm, rank, world) -> json-safe dict; merge(parts) -> metrics of a dataset."""

    def __init__(self, name: str, cfg: DictConfig, model, device, out_dir: str):
        self.name, self.cfg, self.model, self.device, self.out_dir = name, cfg, model, device, out_dir
        self._detections = None

    def part(self, dname: str, dm, rank: int, world: int) -> dict:
        cfg, model = self.cfg, self.model
        if self.name == "points":
            return points_part(model, dm, _protocol(cfg), self.device, rank, world, cfg.max_batches)
        images = eval_images(dm, rank, world, cfg.max_images)
        if self.name == "proposals":
            p = cfg.proposals
            gen = proposal_generator(model, p.points_per_side, p.nms_thresh, p.points_per_batch)
            return proposals_part(gen, images, p.top_k)
        if self.name == "instances":
            p = cfg.instances
            if p.detections != "gt_boxes" and self._detections is None:
                self._detections = load_detections(p.detections, p.min_score)
            return instances_part(SamPredictor(model), images, self._detections, p.refine, p.multimask_first)
        p = cfg.edges
        save = os.path.join(self.out_dir, "edge_maps", dname) if p.save_maps else None
        return edges_part(SamPredictor(model), images, p.points_per_side, p.nms_thresh, p.n_thresholds, save)

    def merge(self, parts: list) -> dict:
        if self.name == "points":
            return points_merge(parts)
        if self.name == "proposals":
            return proposals_merge(parts, tuple(self.cfg.proposals.max_dets))
        if self.name == "instances":
            return instances_merge(parts)
        return edges_merge(parts)

    def section(self, per_dataset: dict) -> dict:
        cfg = self.cfg
        if self.name == "points":
            sec = {
                "datasets": per_dataset,
                "mean": mean_over_datasets(per_dataset),
                "clicks": list(cfg.clicks),
                "protocol": {
                    "multimask_first": cfg.multimask_first,
                    "use_prev_mask": cfg.use_prev_mask,
                    "first_click": cfg.get("first_click", "center"),
                },
                "description": "Interactive single-point mIoU: click 1 at the mask centre (distance-transform "
                "maximum), then on the largest error; default = most confident of 3 masks, "
                "oracle = best.",
            }
            sec["figures"] = [report.plot_points(self.out_dir, sec)]
            return sec
        keys = [k for k in next(iter(per_dataset.values())) if k != "curve"]
        mean = {
            k: sum(d[k] for d in per_dataset.values()) / len(per_dataset)
            for k in keys
            if isinstance(next(iter(per_dataset.values()))[k], float)
        }
        sec = {"datasets": per_dataset, "mean": mean, "settings": OmegaConf.to_container(cfg[self.name])}
        if self.name == "proposals":
            sec["description"] = (
                f"Mask generator as proposals ({cfg.proposals.points_per_side}x"
                f"{cfg.proposals.points_per_side} grid, NMS {cfg.proposals.nms_thresh}, no "
                f"quality filter, top {cfg.proposals.top_k} by mean(pred IoU, stability)); "
                "class-agnostic mask AR by COCOeval."
            )
            sec["figures"] = [report.plot_proposals(self.out_dir, sec, tuple(cfg.proposals.max_dets))]
        elif self.name == "instances":
            sec["description"] = (
                f"Boxes from {cfg.instances.detections} prompt SAM"
                f"{' + one refinement pass (best mask + box)' if cfg.instances.refine else ''}; "
                "mask AP by COCOeval."
            )
        else:
            sec["description"] = (
                f"{cfg.edges.points_per_side}x{cfg.edges.points_per_side} grid, NMS, Sobel on mask "
                "probabilities at the outer boundary, max, normalise, edge NMS; BSDS-style "
                "matching (tolerance 0.0075 x diagonal)."
            )
            sec["figures"] = [report.plot_edges(self.out_dir, sec)]
        return sec


def evaluate(cfg: DictConfig) -> dict:
    """Run the configured task(s); returns the metrics written (rank 0) or {} (other ranks)."""
    tasks = tasks_of(cfg)
    rank, world = topology(cfg.get("rank"), cfg.get("world_size"))
    device = pick_device(cfg.device)
    model, what = load_model(cfg.ckpt_path, cfg.model, cfg.seed)
    model.to(device).eval()
    datasets = dataset_configs(cfg)
    out_dir = output_dir(cfg)
    os.makedirs(out_dir, exist_ok=True)
    metrics: dict = {}
    fp = fingerprint(cfg, cfg.ckpt_path)
    for name in tasks:
        task = _Task(name, cfg, model, device, out_dir)
        t0 = time.time()
        per_dataset = {}
        for dname, node in datasets.items():
            if not cfg.merge_only:
                dm = build_datamodule(
                    dname, node, None if name == "points" else 0, img_size=model.image_encoder.img_size
                )
                write_part(out_dir, name, dname, rank, world, task.part(dname, dm, rank, world), fp)
            if rank == 0:
                per_dataset[dname] = task.merge(
                    gather_parts(out_dir, name, dname, world, cfg.merge_timeout_s if world > 1 else 0, fp)
                )
        if rank != 0:
            continue
        sec = task.section(per_dataset)
        sec["seconds"] = round(time.time() - t0, 1)
        extra = {
            "model": what,
            "data": {d: OmegaConf.select(n, "_target_") for d, n in datasets.items()},
            "world_size": world,
        }
        if name == "points":  # the first version's keys
            extra.update(
                {
                    "num_images": sec["mean"]["num_images"],
                    "seconds": sec["seconds"],
                    "protocol": dict(sec["protocol"], clicks=sec["clicks"]),
                }
            )
        metrics = report.update_metrics(out_dir, name, sec, extra)
        report.write_markdown(out_dir, metrics)
        report.log_wandb(cfg.get("wandb"), out_dir, name, sec)
        log.info("%s: %s", name, json.dumps({k: v for k, v in sec["mean"].items()}))
    if rank == 0:
        log.info("wrote %s", os.path.join(out_dir, "metrics.json"))
    return metrics
