"""evaluate.py's driver: load the model once, then run each requested task on each dataset
(this rank's share), merge the ranks' parts on rank 0 and write the reports.

The tasks are the classes registered in registry.TASKS — points (interactive mIoU),
proposals (mask AR), instances (mask AP from detector boxes), edges (BSDS500 benchmark
ODS/OIS/AP); ``task=all`` runs every registered one.
"""

from __future__ import annotations

import json
import logging
import os
import time

from omegaconf import DictConfig, OmegaConf

from segany.evaluation import report
from segany.evaluation.distributed import fingerprint, gather_parts, write_part
from segany.evaluation.registry import TASKS, task_names
from segany.evaluation.sources import build_datamodule, dataset_configs, dataset_label
from segany.modeling.load import load_model
from segany.utils.dist import pick_device, topology

log = logging.getLogger("evaluate")


def output_dir(cfg: DictConfig, datasets: dict) -> str:
    """cfg.output_dir, else a folder named after the checkpoint and the datasets:
    <run dir>/eval/<ckpt stem>-<datasets> for a train.py checkpoint (the run dir holds checkpoints/),
    <paths.root_dir>/eval/<ckpt stem>-<datasets> for an official .pth, and
    <paths.root_dir>/eval/untrained-<datasets> without one (sources.dataset_label names the datasets)."""
    if cfg.output_dir:
        return cfg.output_dir
    label = dataset_label(datasets, named=bool(cfg.get("datasets")))
    ck = cfg.ckpt_path
    if not ck:
        return os.path.join(cfg.paths.root_dir, "eval", f"untrained-{label}")
    ck = os.path.abspath(str(ck).rstrip("/"))
    stem = os.path.splitext(os.path.basename(ck))[0]
    base = cfg.paths.root_dir if ck.endswith(".pth") else os.path.dirname(os.path.dirname(ck))
    return os.path.join(base, "eval", f"{stem}-{label}")


def evaluate(cfg: DictConfig) -> dict:
    """Run the configured task(s); returns the metrics written (rank 0) or {} (other ranks)."""
    names = task_names(cfg)
    rank, world = topology(cfg.get("rank"), cfg.get("world_size"))
    device = pick_device(cfg.device)
    model, what = load_model(cfg.ckpt_path, cfg.model, cfg.seed, trust_checkpoint=bool(cfg.get("ckpt_trust", False)))
    model.to(device).eval()
    datasets = dataset_configs(cfg)
    out_dir = output_dir(cfg, datasets)
    os.makedirs(out_dir, exist_ok=True)
    metrics: dict = {}
    fp = fingerprint(cfg, cfg.ckpt_path)
    for name in names:
        task = TASKS[name](cfg, model, device, out_dir)
        t0 = time.time()
        per_dataset = {}
        for dname, node in datasets.items():
            if not cfg.merge_only:
                dm = build_datamodule(dname, node, task.num_workers, img_size=model.image_encoder.img_size)
                write_part(out_dir, name, dname, rank, world, task.part(dname, dm, rank, world), fp)
            if rank == 0:
                parts = gather_parts(out_dir, name, dname, world, cfg.merge_timeout_s if world > 1 else 0, fp)
                per_dataset[dname] = task.merge(parts)
        if rank != 0:
            continue
        sec = task.report(per_dataset)
        sec["seconds"] = round(time.time() - t0, 1)
        extra = {
            "model": what,
            "data": {d: OmegaConf.select(n, "_target_") for d, n in datasets.items()},
            "world_size": world,
        }
        metrics = report.update_metrics(out_dir, name, sec, extra, task.top_level(sec))
        report.write_markdown(out_dir, metrics, {n: cls.columns for n, cls in TASKS.items()})
        report.log_wandb(cfg.get("wandb"), out_dir, name, sec)
        log.info("%s: %s", name, json.dumps({k: v for k, v in sec["mean"].items()}))
    if rank == 0:
        log.info("wrote %s", os.path.join(out_dir, "metrics.json"))
    return metrics
