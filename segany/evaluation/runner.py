"""evaluate.py's driver: load the model once, then run each requested task on each dataset
(this rank's share), merge the ranks' parts on rank 0 and write the reports.

The tasks are the classes registered in registry.TASKS — points (interactive mIoU),
noc (RITM's NoC / mIoU-vs-clicks benchmark), proposals (mask AR), instances (mask AP from
detector boxes), edges (BSDS500 benchmark ODS/OIS/AP); ``task=all`` runs every registered one.
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
from segany.inference.predictor import autocast_context
from segany.modeling.checkpoint import load_model
from segany.utils.dist import pick_device, topology

log = logging.getLogger("evaluate")


def output_dir(cfg: DictConfig, datasets: dict) -> str:
    """cfg.output_dir, else a folder named after the checkpoint and the datasets:
    <run dir>/eval/<ckpt stem>-<datasets> for a train.py checkpoint (the run dir holds checkpoints/),
    <paths.root_dir>/eval/<ckpt stem>-<datasets> for an official .pth, and
    <paths.root_dir>/eval/untrained-<datasets> without one (sources.dataset_label names the datasets;
    with an eval_suite, <datasets> is the suite's name: runs/demo/eval/last-interactive)."""
    if cfg.output_dir:
        return cfg.output_dir
    label = cfg.get("suite") or dataset_label(datasets, named=bool(cfg.get("datasets")))
    ck = cfg.checkpoint
    if not ck:
        return os.path.join(cfg.paths.root_dir, "eval", f"untrained-{label}")
    ck = os.path.abspath(str(ck).rstrip("/"))
    stem = os.path.splitext(os.path.basename(ck))[0]
    base = cfg.paths.root_dir if ck.endswith(".pth") else os.path.dirname(os.path.dirname(ck))
    return os.path.join(base, "eval", f"{stem}-{label}")


def evaluate(cfg: DictConfig) -> dict:
    """Run the configured task(s); returns the metrics written (rank 0) or {} (other ranks)."""
    task_names(cfg)  # a wrong task name fails before the model is loaded
    rank, world = topology(cfg.get("rank"), cfg.get("world_size"))
    device = pick_device(cfg.device)
    model, what = load_model(cfg.checkpoint, cfg.model, cfg.seed, trust_checkpoint=cfg.trust_checkpoint)
    model.to(device).eval()
    datasets = dataset_configs(cfg)
    fp = fingerprint(cfg, cfg.checkpoint)
    # bf16: every task's encoder / decoder calls under torch.autocast; weights and outputs stay fp32
    with autocast_context(cfg.get("precision", "fp32"), device):
        return run_tasks(cfg, model, what, device, output_dir(cfg, datasets), datasets, rank, world, fp)


def _datamodule(cfg: DictConfig, dname: str, node, task, model, skipped: dict):
    """build_datamodule, or None (and `skipped[dname]` = the reason) when the dataset's files are
    missing and cfg.skip_missing is set (eval suites: a dataset not downloaded is skipped, not an error)."""
    try:
        return build_datamodule(dname, node, task.num_workers, img_size=model.image_encoder.img_size)
    except FileNotFoundError as e:
        if not cfg.get("skip_missing"):
            raise
        skipped[dname] = str(e)
        log.warning("dataset %s skipped: not on disk (%s)", dname, e)
        return None


def run_tasks(
    cfg: DictConfig, model, what: str, device, out_dir: str, datasets: dict, rank=0, world=1, fp=None
) -> dict:
    """Each task of cfg.task on each dataset with an already loaded model (evaluate.py, and
    segany.callbacks.ZeroShotValidation during training): this rank's parts, rank 0 merges and
    writes metrics.json, results.md, plots (and logs to wandb when cfg.wandb.enabled). Datasets
    missing on disk are skipped with cfg.skip_missing (listed under "skipped" in metrics.json).
    -> the metrics written (rank 0) or {} (other ranks)."""
    os.makedirs(out_dir, exist_ok=True)
    metrics: dict = {}
    skipped: dict = {}  # dataset -> why (its files are missing)
    for name in task_names(cfg):
        task = TASKS[name](cfg, model, device, out_dir)
        t0 = time.time()
        per_dataset = {}
        for dname, node in datasets.items():
            if dname in skipped:
                continue
            if not cfg.merge_only:
                dm = _datamodule(cfg, dname, node, task, model, skipped)
                if dm is None:
                    continue
                write_part(out_dir, name, dname, rank, world, task.part(dname, dm, rank, world), fp)
            if rank == 0:
                parts = gather_parts(out_dir, name, dname, world, cfg.merge_timeout_s if world > 1 else 0, fp)
                per_dataset[dname] = task.merge(parts)
        if not per_dataset and rank == 0:
            raise FileNotFoundError(
                f"none of the datasets is on disk ({', '.join(datasets)}); see the log above, or set paths.data_dir"
            )
        if rank != 0:
            continue
        sec = task.summarize(per_dataset)
        sec["figures"] = [report.plot(out_dir, sec, p) for p in task.plots]
        sec["seconds"] = round(time.time() - t0, 1)
        extra = {
            "model": what,
            "suite": cfg.get("suite"),
            "data": {d: OmegaConf.select(n, "_target_") for d, n in datasets.items() if d not in skipped},
            "skipped": skipped,
            "world_size": world,
        }
        metrics = report.update_metrics(out_dir, name, sec, extra)
        report.write_markdown(out_dir, metrics, {n: cls.columns for n, cls in TASKS.items()})
        report.log_wandb(cfg.get("wandb"), out_dir, name, sec)
        log.info("%s: %s", name, json.dumps({k: v for k, v in sec["mean"].items()}))
    if rank == 0:
        log.info("wrote %s", os.path.join(out_dir, "metrics.json"))
    return metrics
