"""ForgettingCheck: did fine-tuning make the model forget how to segment anything?

A ZeroShotValidation (the same evaluation code as evaluate.py, on a fixed subset of each
dataset) that runs before the first step and after the last one on the fine-tuning data's
held-out split (``target``) and on a held-out general set (``general``: by default the
synthetic scenes; any evaluate.py dataset entry), then writes the figures side by side:

    <report>.md    | metric | target before | target after | change | general before | ... |
    <report>.json  {"steps": {"before": 0, "after": N}, "datasets": [...], "rows": [
                     {"dataset", "metric", "before", "after", "change"}, ...]}

The two evaluations are the files <out_dir>/step0000000/metrics.json and
<out_dir>/step<N>/metrics.json; the table is read from them, so a run resumed after step 0
still compares against the model it started from. A figure in the table equals
``python evaluate.py checkpoint=<checkpoint> datasets=...`` with the same settings on the same
subset (tests/test_finetune.py).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from segany.callbacks.zero_shot import ZeroShotValidation
from segany.utils.io import atomic_write_json

log = logging.getLogger(__name__)


class ForgettingCheck(ZeroShotValidation):
    """ZeroShotValidation with at_start and at_end on; metrics: "<task>/<metric>" names of the
    table's rows (e.g. points/miou@1); report: path stem of the .md / .json table;
    dataset_overrides: keys set in every dataset entry that has them (e.g. {max_masks: 64}: the
    target entry is the training data config, whose max_masks samples a few masks per image).
    Every other keyword as ZeroShotValidation (every_n_steps null: only before and after)."""

    def __init__(
        self,
        datasets: dict,
        metrics: Sequence[str] = ("points/miou@1",),
        report: str = "forgetting",
        every_n_steps: Optional[int] = None,
        dataset_overrides: Optional[dict] = None,
        **kwargs,
    ):
        super().__init__(every_n_steps=every_n_steps, datasets=datasets, at_start=True, at_end=True, **kwargs)
        over = OmegaConf.to_container(dataset_overrides) if isinstance(dataset_overrides, DictConfig) else None
        over = over if over is not None else dict(dataset_overrides or {})
        # e.g. max_masks: evaluate every mask of an image, not the training data's per-image sample
        self.datasets = {
            name: OmegaConf.merge(node, {k: v for k, v in over.items() if k in node})
            for name, node in self.datasets.items()
        }
        bad = [m for m in metrics if "/" not in str(m)]
        if bad or not metrics:
            raise ValueError(f"ForgettingCheck: metrics {list(metrics)!r}: expected names '<task>/<metric>'")
        tasks = {str(m).split("/", 1)[0] for m in metrics}
        unknown = sorted(tasks - set(self.cfg.task))
        if unknown:
            raise ValueError(f"ForgettingCheck: metrics name task(s) {unknown} not among tasks {list(self.cfg.task)}")
        self.metrics = [str(m) for m in metrics]
        self.report = str(report)

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        if trainer.global_rank == 0:
            self.write_table(trainer.global_step)

    def _metrics_at(self, step: int) -> Optional[dict]:
        path = os.path.join(self.out_dir, f"step{step:07d}", "metrics.json")
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    def table(self, before: dict, after: dict, steps: tuple) -> dict:
        """Two metrics.json contents -> the table's json content."""
        rows = []
        for dname in self.datasets:
            for name in self.metrics:
                task, metric = name.split("/", 1)
                b = before.get(task, {}).get("datasets", {}).get(dname, {}).get(metric)
                a = after.get(task, {}).get("datasets", {}).get(dname, {}).get(metric)
                change = None if a is None or b is None else a - b
                rows.append({"dataset": dname, "metric": name, "before": b, "after": a, "change": change})
        return {"steps": {"before": steps[0], "after": steps[1]}, "datasets": list(self.datasets), "rows": rows}

    def write_table(self, last_step: int) -> Optional[dict]:
        before, after = self._metrics_at(0), self._metrics_at(last_step)
        if before is None or after is None:
            log.warning(
                "ForgettingCheck: no evaluation %s in %s; no before/after table",
                "at step 0" if before is None else f"at step {last_step}",
                self.out_dir,
            )
            return None
        doc = self.table(before, after, (0, last_step))
        os.makedirs(os.path.dirname(os.path.abspath(self.report)), exist_ok=True)
        atomic_write_json(self.report + ".json", doc, indent=1)
        with open(self.report + ".md", "w") as f:
            f.write(markdown(doc))
        log.info("before/after table: %s.md", self.report)
        return doc


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def markdown(doc: dict) -> str:
    """The table's json content -> a markdown table: one row per metric, before / after /
    change for each dataset side by side."""
    steps, names = doc["steps"], doc["datasets"]
    cells = {(r["dataset"], r["metric"]): r for r in doc["rows"]}
    metrics = list(dict.fromkeys(r["metric"] for r in doc["rows"]))
    head = ["metric"]
    for d in names:
        head += [f"{d} before (step {steps['before']})", f"{d} after (step {steps['after']})", f"{d} change"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in metrics:
        row = [m]
        for d in names:
            r = cells[(d, m)]
            change = "n/a" if r["change"] is None else f"{r['change']:+.3f}"
            row += [_fmt(r["before"]), _fmt(r["after"]), change]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
