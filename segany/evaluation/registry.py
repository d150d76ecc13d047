"""The zero-shot tasks' common interface and their registry (the pattern of detectron2's
``DatasetEvaluator``, whose reset / process / evaluate are part / merge / summarize here): one
class per task, registered under its name with ``@register("name")``; the runner looks the
requested names up in ``TASKS`` and calls the same three methods on each.

Per dataset, every rank runs ``part`` on its share and writes the json-safe payload; rank 0
``merge``s the ranks' payloads into the dataset's metrics, then ``summarize``s all datasets into
the task's section of metrics.json, one shape for every task: {"datasets": {name: metrics},
"mean", "settings" (cfg.<task>), "description", "references" (reference methods: their
"datasets" and "mean"), and from the runner "figures" and "seconds"}. What results.md and the
plots show is data on the class (``description``, ``columns``, ``plots``), drawn by report.py
the same way for every task.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

from segany.evaluation.sources import EvalImage, eval_images

TASKS: dict = {}  # name -> EvalTask subclass, in registration order (the order of task=all)


def register(name: str):
    """Class decorator: ``@register("points")`` makes the task available as ``task=points``."""

    def add(cls):
        if name in TASKS:
            raise ValueError(f"task {name!r} is registered twice ({TASKS[name].__qualname__}, {cls.__qualname__})")
        cls.name = name
        TASKS[name] = cls
        return cls

    return add


def task_names(cfg: DictConfig) -> list:
    """cfg.task (a name, a list of names, or all) -> the names to run, checked against TASKS."""
    t = cfg.get("task", "points")
    names = list(t) if isinstance(t, (list, ListConfig)) else [str(t)]
    if names == ["all"]:
        return [n for n, cls in TASKS.items() if cls.in_all]
    bad = [n for n in names if n not in TASKS]
    if bad:
        raise ValueError(f"task={bad[0]!r}: expected one of {', '.join(TASKS)} or all")
    return names


def mean_over_datasets(per_dataset: dict) -> dict:
    """dataset -> metrics ==> each float metric's unweighted mean over the datasets where it is
    defined (not NaN: e.g. an area bin without masks), each count (int) summed; other values
    (curves) left out. The paper averages its 23 datasets this way."""
    out = {}
    for k, v in next(iter(per_dataset.values())).items():
        vals = [d[k] for d in per_dataset.values() if k in d]
        if isinstance(v, float):
            vals = [x for x in vals if not math.isnan(x)]
            out[k] = sum(vals) / len(vals) if vals else float("nan")
        elif isinstance(v, int) and not isinstance(v, bool):
            out[k] = int(sum(vals))
    return out


def split_references(per_dataset: dict) -> tuple:
    """dataset -> metrics with an optional "references" entry (method -> metrics, from merge) ==>
    (dataset -> the model's metrics, method -> dataset -> that method's metrics)."""
    model = {d: {k: v for k, v in m.items() if k != "references"} for d, m in per_dataset.items()}
    refs: dict = {}
    for d, m in per_dataset.items():
        for name, r in m.get("references", {}).items():
            refs.setdefault(name, {})[d] = r
    return model, refs


class EvalTask:
    """One task on one model: part (a rank's share of a dataset -> a json-safe payload) -> merge
    (the ranks' payloads of one dataset -> its metrics, a reference method's under "references")
    -> summarize (all datasets -> the task's section). A task writes part and merge, and states
    as data what its section shows."""

    name = ""  # set by @register
    in_all = True  # run by task=all (False: tasks that need a particular model, e.g. the text token)
    num_workers: Optional[int] = 0  # loader workers of the datamodule part() reads (None: its config's)
    description = ""  # results.md's paragraph, str.format-ted with the task's settings (cfg.<name>)
    columns: tuple = ()  # results.md's table: regular expressions of metric names (report.column_names)
    plots: tuple = ()  # the figures (report.Plot each)

    def __init__(self, cfg: DictConfig, model, device, out_dir: str):
        self.cfg, self.model, self.device, self.out_dir = cfg, model, device, out_dir
        self._untrained = None

    def untrained_model(self):
        """The model's architecture freshly initialised with cfg.seed (evaluate.py's untrained
        baseline, modeling.checkpoint.untrained_like), on the device, in eval mode; built once per task."""
        if self._untrained is None:
            from segany.modeling.checkpoint import untrained_like

            self._untrained = untrained_like(self.model, self.cfg.seed).to(self.device).eval()
        return self._untrained

    def part(self, dataset: str, dm, rank: int, world: int) -> dict:
        """This rank's share of the set-up datamodule's validation split -> a json-safe payload."""
        raise NotImplementedError

    def merge(self, parts: list) -> dict:
        """The payloads of all ranks (rank order) -> the metrics of one dataset."""
        raise NotImplementedError

    def summarize(self, per_dataset: dict) -> dict:
        """dataset -> metrics (merge's) ==> the task's section: datasets, their mean
        (mean_over_datasets), settings, description, and each reference method's datasets and mean."""
        model, refs = split_references(per_dataset)
        node = self.cfg.get(self.name)
        settings = OmegaConf.to_container(node, resolve=True) if node is not None else {}
        sec = {"datasets": model, "mean": mean_over_datasets(model), "settings": settings}
        sec["description"] = self.description.format(**settings)
        if refs:
            sec["references"] = {n: {"datasets": r, "mean": mean_over_datasets(r)} for n, r in refs.items()}
        return sec


class ImageTask(EvalTask):
    """A task on the raw validation images at their stored resolution (sources.eval_images),
    bounded by cfg.max_images; the datamodule's own loader and workers are not used. every_image:
    the tasks scored by COCOeval also see the images without annotations (sources.eval_images)."""

    num_workers = 0
    every_image = False

    def part(self, dataset: str, dm, rank: int, world: int) -> dict:
        return self.part_images(dataset, eval_images(dm, rank, world, self.cfg.max_images, self.every_image))

    def part_images(self, dataset: str, images: Iterable[EvalImage]) -> dict:
        raise NotImplementedError
