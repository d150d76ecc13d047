"""Outputs of evaluate.py: metrics.json (one section per task; the points task's mean over
datasets also flat at the top level, as before), results.md (markdown tables), plots
(mIoU against clicks, edge PR curve) and, when enabled, a wandb run."""

from __future__ import annotations

import json
import logging
import math
import os

log = logging.getLogger("evaluate")


def update_metrics(out_dir: str, task: str, section: dict, extra: dict, top_level: dict) -> dict:
    """Merge a task's section into <out_dir>/metrics.json (other tasks' sections are kept):
    extra (model, data, ...), the section under the task's name, then the task's top-level keys."""
    path = os.path.join(out_dir, "metrics.json")
    metrics = {}
    if os.path.isfile(path):
        try:
            with open(path) as f:
                metrics = json.load(f)
        except ValueError:
            log.warning("%s is not valid JSON; rewriting it", path)
    metrics.update(extra)
    metrics[task] = section
    metrics.update(top_level)
    with open(path, "w") as f:
        json.dump(metrics, f, indent=1)
    return metrics


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def table(rows: dict, columns) -> str:
    """rows: name -> metric dict -> a markdown table."""
    lines = ["| dataset | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(m.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _rows(sec: dict, suffix: str = "") -> dict:
    """A section's (or a reference method's) rows: each dataset, and their mean when several."""
    rows = {f"{d}{suffix}": m for d, m in sec["datasets"].items()}
    if len(sec["datasets"]) > 1:
        rows[f"**mean**{suffix}"] = sec["mean"]
    return rows


def write_markdown(out_dir: str, metrics: dict, columns: dict) -> str:
    """results.md: a table per task section in metrics.json (a row per dataset and their mean;
    with reference methods, section["references"], rows "<dataset> (model)", "<dataset> (<method>)"),
    after the list of datasets skipped as not on disk; columns: task name -> its columns(section)
    (in the order of the tables)."""
    suite = f" on the {metrics['suite']} suite" if metrics.get("suite") else ""
    parts = [f"# Evaluation of {metrics.get('model', '?')}{suite}", ""]
    if metrics.get("skipped"):
        parts += ["Skipped (not on disk): " + ", ".join(f"{d}" for d in metrics["skipped"]), ""]
    for task, cols_of in columns.items():
        if task not in metrics:
            continue
        sec = metrics[task]
        rows = _rows(sec, " (model)" if sec.get("references") else "")
        for method, ref in sec.get("references", {}).items():  # a row per reference method and dataset
            rows.update(_rows(ref, f" ({method})"))
        parts += [f"## {task}", "", sec.get("description", ""), "", table(rows, cols_of(sec)), ""]
        for fig in sec.get("figures", []):
            parts += [f"![{task}]({fig})", ""]
    path = os.path.join(out_dir, "results.md")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(plt, fig, ax, out_dir: str, filename: str) -> str:
    """Grid, legend, save as out_dir/filename, close; -> filename."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, filename), dpi=120)
    plt.close(fig)
    return filename


def plot_points(out_dir: str, section: dict) -> str:
    plt = _pyplot()
    ks = section["clicks"]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, m in section["datasets"].items():
        ax.plot(ks, [m[f"miou@{k}"] for k in ks], marker="o", label=name)
    if len(section["datasets"]) > 1:
        ax.plot(ks, [section["mean"][f"miou@{k}"] for k in ks], "k--", marker="s", label="mean")
    ax.plot(ks, [section["mean"][f"miou_oracle@{k}"] for k in ks], ":", color="gray", label="oracle (mean)")
    for name, ref in section.get("references", {}).items():  # reference methods: their mean over datasets
        ax.plot(ks, [ref["mean"][f"miou@{k}"] for k in ks], "-.", marker="x", label=name)
    ax.set_xlabel("number of points")
    ax.set_ylabel("mIoU")
    ax.set_xticks(ks)
    ax.set_ylim(0, 1)
    return _finish(plt, fig, ax, out_dir, "points_miou_vs_clicks.png")


def plot_edges(out_dir: str, section: dict) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4, 4))
    for name, m in section["datasets"].items():
        c = m["curve"]
        ax.plot(c["recall"], c["precision"], label=f"{name} (ODS {m['ODS']:.3f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    return _finish(plt, fig, ax, out_dir, "edges_pr.png")


def plot_proposals(out_dir: str, section: dict, max_dets) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    for name, m in section["datasets"].items():
        ax.plot(list(max_dets), [m[f"AR@{k}"] for k in max_dets], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("proposals per image")
    ax.set_ylabel("mask AR")
    ax.set_ylim(0, 1)
    return _finish(plt, fig, ax, out_dir, "proposals_ar.png")


def log_wandb(wandb_cfg, out_dir: str, task: str, section: dict) -> None:
    """Log the task's per-dataset and mean scalars and its figures to a wandb run (offline
    without credentials, like training)."""
    if not wandb_cfg or not wandb_cfg.get("enabled"):
        return
    import wandb

    from segany.utils.wandb import wandb_offline

    offline = wandb_offline(wandb_cfg.get("offline"))
    run = wandb.run or wandb.init(
        project=wandb_cfg.get("project", "segany"),
        name=wandb_cfg.get("name"),
        dir=out_dir,
        mode="offline" if offline else "online",
        job_type="eval",
    )
    flat = {}
    for name, m in {**section["datasets"], "mean": section["mean"]}.items():
        for k, v in m.items():
            if isinstance(v, (int, float)):
                flat[f"{task}/{name}/{k}"] = v
    flat.update({f"{task}/figure/{f}": wandb.Image(os.path.join(out_dir, f)) for f in section.get("figures", [])})
    run.log(flat)
