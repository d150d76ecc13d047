"""Outputs of evaluate.py, the same for every task: metrics.json (a section per task, see
registry.py), results.md (a table per task: its ``columns``), the plots (its ``plots``, a Plot
each) and, when enabled, a wandb run."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass

log = logging.getLogger("evaluate")


def update_metrics(out_dir: str, task: str, section: dict, extra: dict) -> dict:
    """Merge a task's section into <out_dir>/metrics.json (other tasks' sections are kept):
    extra (model, data, ...) and the section under the task's name."""
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
    with open(path, "w") as f:
        json.dump(metrics, f, indent=1)
    return metrics


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def column_names(section: dict, patterns) -> list:
    """A task's ``columns`` (regular expressions) -> the metric names of its table: for each
    pattern in turn, the first dataset's metrics it matches in full, in that dataset's order."""
    first = next(iter(section["datasets"].values()))
    return list(dict.fromkeys(k for p in patterns for k in first if re.fullmatch(p, k)))


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
    after the list of datasets skipped as not on disk; columns: task name -> its ``columns``
    (column_names; in the order of the tables)."""
    suite = f" on the {metrics['suite']} suite" if metrics.get("suite") else ""
    parts = [f"# Evaluation of {metrics.get('model', '?')}{suite}", ""]
    if metrics.get("skipped"):
        parts += ["Skipped (not on disk): " + ", ".join(f"{d}" for d in metrics["skipped"]), ""]
    for task, patterns in columns.items():
        if task not in metrics:
            continue
        sec = metrics[task]
        rows = _rows(sec, " (model)" if sec.get("references") else "")
        for method, ref in sec.get("references", {}).items():  # a row per reference method and dataset
            rows.update(_rows(ref, f" ({method})"))
        parts += [f"## {task}", "", sec.get("description", ""), "", table(rows, column_names(sec, patterns)), ""]
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


@dataclass(frozen=True)
class Plot:
    r"""A task's figure, as data; ``plot`` draws the figures of every task alike: a line per
    dataset, their mean (dashed) when there are several, each reference method's mean (dash-dot).

    y: a regular expression of the plotted metrics whose group is the x value (r"miou@(\d+)":
    mIoU against the number of clicks); or curve: (metric, x key, y key), a metric holding a
    curve's lists (the edges' {"recall": [...], "precision": [...]}; no mean line). oracle: a
    second expression like y, its mean over datasets dotted. label: a metric shown in each
    dataset's legend entry. Both axes of a curve, and every y, lie in [0, 1]."""

    file: str  # the PNG's name in the output folder
    xlabel: str
    ylabel: str
    y: str = ""
    curve: tuple = ()
    oracle: str = ""
    label: str = ""
    log_x: bool = False


def _series(m: dict, p: Plot, pattern: str) -> tuple:
    """(xs, ys) of one metrics dict: its curve, or the metrics named by pattern by their number."""
    if p.curve:
        c = m.get(p.curve[0])
        return (c[p.curve[1]], c[p.curve[2]]) if c else ([], [])
    found = sorted((int(g.group(1)), v) for k, v in m.items() if (g := re.fullmatch(pattern, k)))
    return [x for x, _ in found], [v for _, v in found]


def plot(out_dir: str, section: dict, p: Plot) -> str:
    """Draw p from a task's section into out_dir; -> the file name."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, m in section["datasets"].items():
        label = f"{name} ({p.label} {m[p.label]:.3f})" if p.label else name
        ax.plot(*_series(m, p, p.y), marker=".", label=label)
    mean = _series(section["mean"], p, p.y)
    if len(section["datasets"]) > 1 and mean[0]:
        ax.plot(*mean, "k--", label="mean")
    if p.oracle:
        ax.plot(*_series(section["mean"], p, p.oracle), ":", color="gray", label="oracle (mean)")
    for name, ref in section.get("references", {}).items():
        ax.plot(*_series(ref["mean"], p, p.y), "-.", marker="x", markersize=3, label=name)
    xs = _series(next(iter(section["datasets"].values())), p, p.y)[0]
    if p.log_x:
        ax.set_xscale("log")
    if p.curve:
        ax.set_xlim(0, 1)
    elif len(xs) <= 10:
        ax.set_xticks(xs)
    else:
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel(p.xlabel)
    ax.set_ylabel(p.ylabel)
    ax.set_ylim(0, 1)
    return _finish(plt, fig, ax, out_dir, p.file)


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
