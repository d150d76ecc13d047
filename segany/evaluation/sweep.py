"""``python evaluate.py sweep_dir=DIR``: evaluate every run of a sweep with the points task and
tabulate them — one row per run directory under DIR that holds checkpoints/last.ckpt: its
name, its overrides (Hydra's overrides.yaml in .hydra/ or hydra/, else an ``overrides`` list
in its config.yaml) and mIoU at each click count, in DIR/results.md and DIR/results.json.
Each run's own metrics go to <run>/eval/last-<dataset>/ as with checkpoint=."""

from __future__ import annotations

import json
import logging
import os

from omegaconf import DictConfig, OmegaConf

from segany.evaluation.report import _fmt

log = logging.getLogger("evaluate")


def find_runs(sweep_dir: str) -> list:
    if not os.path.isdir(sweep_dir):
        raise FileNotFoundError(f"sweep_dir={sweep_dir}: no such directory")
    runs = sorted(dp for dp, _, fs in os.walk(sweep_dir) if os.path.basename(dp) == "checkpoints" and "last.ckpt" in fs)
    runs = [os.path.dirname(r) for r in runs]
    if not runs:
        raise FileNotFoundError(f"sweep_dir={sweep_dir}: no run directory with checkpoints/last.ckpt under it")
    return runs


def run_overrides(run_dir: str) -> list:
    for sub in (".hydra", "hydra"):
        path = os.path.join(run_dir, sub, "overrides.yaml")
        if os.path.isfile(path):
            found = OmegaConf.load(path)
            if not OmegaConf.is_list(found):
                raise ValueError(f"{path}: expected a list of overrides")
            return [str(o) for o in found]
    cfg_path = os.path.join(run_dir, "config.yaml")
    if os.path.isfile(cfg_path):
        found = OmegaConf.load(cfg_path).get("overrides")
        if found is not None:
            return [str(o) for o in found]
    return []


def evaluate_sweep(cfg: DictConfig) -> dict:
    from segany.evaluation.runner import evaluate

    sweep_dir = cfg.sweep_dir
    rows = []
    for run in find_runs(sweep_dir):
        run_cfg = OmegaConf.merge(
            cfg,
            {
                "sweep_dir": None,
                "task": "points",
                "output_dir": None,
                "checkpoint": os.path.join(run, "checkpoints", "last.ckpt"),
            },
        )
        log.info("sweep: evaluating %s", run)
        metrics = evaluate(run_cfg)
        if not metrics:  # not rank 0
            continue
        rows.append(
            {
                "run": os.path.relpath(run, sweep_dir),
                "overrides": run_overrides(run),
                **{k: v for k, v in metrics["points"]["mean"].items()},
            }
        )
    if not rows:
        return {}
    clicks = list(cfg.points.clicks)
    with open(os.path.join(sweep_dir, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    cols = [f"miou@{k}" for k in clicks] + [f"miou_oracle@{clicks[0]}", "num_masks"]
    lines = [
        f"# Sweep {os.path.abspath(sweep_dir)}",
        "",
        "points task, mean over datasets",
        "",
        "| run | overrides | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 2) + "|",
    ]
    for r in rows:
        ov = " ".join(f"`{o}`" for o in r["overrides"]) or "—"
        lines.append(f"| {r['run']} | {ov} | " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    with open(os.path.join(sweep_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    log.info("wrote %s", os.path.join(sweep_dir, "results.md"))
    return {"runs": rows}
