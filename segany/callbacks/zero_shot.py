"""ZeroShotValidation: the zero-shot evaluation tasks as validation during training.

Every ``every_n_steps`` optimiser steps (and, with ``at_start`` / ``at_end``, before the first
step and after the last one) it runs the registered evaluation task(s) (``tasks``:
points, proposals, instances, edges, or any other name in segany.evaluation.TASKS) on a small
fixed subset of the configured datasets — the first ``max_batches`` batches (points) or
``max_images`` images (the image tasks) of each validation split — through the same code as
evaluate.py (segany.evaluation.runner.run_tasks, with the model being trained), and

- logs each dataset's float metrics (and their mean over datasets when there are several) to
  the trainer's loggers as ``<prefix>/<task>/<dataset>/<metric>``, e.g. ``zero_shot/points/val/miou@1``;
- writes evaluate.py's outputs (metrics.json, results.md, plots) to ``<out_dir>/step<NNNNNNN>/``,
  and sends the plots to wandb as images when a WandbLogger is among the loggers.

Task settings (points.*, proposals.*, edges.*, ...) are evaluate.py's defaults, read from
configs/evaluate.yaml (``eval_config``), with ``settings`` merged over them; so a figure logged
here equals ``python evaluate.py checkpoint=<the step's checkpoint>`` with the same settings on
the same subset (tests/test_zero_shot_callback.py checks it).

Distributed: rank 0 evaluates the whole subset alone on its copy of the model (fp32, eval mode,
no gradients, its RNG state restored afterwards); the other ranks wait at a barrier, so a long
evaluation must stay within the process group's timeout — keep the subset small. Under FSDP
(sharded parameters) rank 0 cannot run the model alone: the callback refuses at the start of fit;
evaluate the saved checkpoints with evaluate.py instead.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.seed import isolate_rng

from segany.evaluation.registry import task_names
from segany.evaluation.runner import run_tasks
from segany.evaluation.sources import dataset_configs
from segany.training.sharding import is_sharded

log = logging.getLogger(__name__)

EVAL_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "evaluate.yaml"


def eval_settings(eval_config: Optional[str], overrides: dict) -> DictConfig:
    """evaluate.yaml's own keys (not its defaults list or hydra node) with `overrides` merged over."""
    path = Path(eval_config) if eval_config else EVAL_CONFIG
    if not path.is_file():
        raise FileNotFoundError(
            f"ZeroShotValidation: evaluation config {path} not found (set callbacks.zero_shot.eval_config)"
        )
    base = OmegaConf.load(path)
    for key in ("defaults", "hydra"):
        base.pop(key, None)
    return OmegaConf.merge(base, overrides)


class ZeroShotValidation(pl.Callback):
    """every_n_steps: evaluation period in optimiser steps (null: none); at_start: also evaluate
    the model as training starts (step 0; not when resuming a run past it); at_end: also after
    the last step (unless the period just evaluated that step); datasets: name -> datamodule config
    (evaluate.py's ``datasets``); tasks: task names; max_batches / max_images: the subset;
    settings: evaluate.py keys merged over its defaults; prefix: of the logged names; out_dir:
    where each evaluation's files go (a step<NNNNNNN> folder each); eval_config: evaluate.yaml."""

    def __init__(
        self,
        every_n_steps: Optional[int],
        datasets: dict,
        tasks: Sequence[str] = ("points",),
        max_batches: Optional[int] = 2,
        max_images: Optional[int] = 4,
        settings: Optional[dict] = None,
        prefix: str = "zero_shot",
        out_dir: str = "zero_shot",
        eval_config: Optional[str] = None,
        at_start: bool = False,
        at_end: bool = False,
    ):
        if every_n_steps is not None and int(every_n_steps) < 1:
            raise ValueError(f"ZeroShotValidation: every_n_steps={every_n_steps} must be >= 1 (or null: none)")
        if not datasets:
            raise ValueError("ZeroShotValidation: datasets is empty (name -> datamodule config)")
        settings = OmegaConf.to_container(settings) if isinstance(settings, DictConfig) else dict(settings or {})
        self.cfg = eval_settings(
            eval_config,
            dict(
                settings,
                task=list(tasks),
                datasets=OmegaConf.to_container(datasets) if isinstance(datasets, DictConfig) else dict(datasets),
                max_batches=max_batches,
                max_images=max_images,
                wandb={"enabled": False},  # the figures go to the trainer's loggers instead
            ),
        )
        task_names(self.cfg)  # an unknown task fails at start-up, naming it
        self.datasets = dataset_configs(self.cfg)
        self.every_n_steps = None if every_n_steps is None else int(every_n_steps)
        self.prefix, self.out_dir = prefix, str(out_dir)
        self.at_start, self.at_end = bool(at_start), bool(at_end)
        self._last_step = -1  # on_train_batch_end runs per micro-batch; evaluate once per step

    def on_fit_start(self, trainer, pl_module):
        if is_sharded(pl_module.model):
            raise ValueError(
                "ZeroShotValidation: the model is sharded (FSDP); rank 0 cannot run it alone. "
                "Drop callbacks.zero_shot and evaluate the checkpoints with evaluate.py"
            )

    def on_train_start(self, trainer, pl_module):
        if self.at_start and trainer.global_step == 0:
            self._evaluate_all_ranks(trainer, pl_module, 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every_n_steps is None or step == 0 or step % self.every_n_steps or step == self._last_step:
            return
        self._evaluate_all_ranks(trainer, pl_module, step)

    def on_train_end(self, trainer, pl_module):
        if self.at_end and trainer.global_step != self._last_step:
            self._evaluate_all_ranks(trainer, pl_module, trainer.global_step)

    def _evaluate_all_ranks(self, trainer, pl_module, step: int) -> None:
        self._last_step = step
        if trainer.global_rank == 0:
            self.evaluate(trainer, pl_module.model, step)
        trainer.strategy.barrier("zero_shot_validation")

    def evaluate(self, trainer, model: torch.nn.Module, step: int) -> dict:
        """Run the tasks on `model` as it is now; log the figures at `step`; -> the metrics."""
        out_dir = os.path.join(self.out_dir, f"step{step:07d}")
        was_training = model.training
        model.eval()
        try:
            with isolate_rng(), torch.no_grad():
                metrics = run_tasks(
                    self.cfg, model, f"training step {step}", next(model.parameters()).device, out_dir, self.datasets
                )
        finally:
            model.train(was_training)
        scalars, figures = self.flatten(metrics, out_dir)
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
            if hasattr(logger, "log_image"):  # WandbLogger
                for key, path in figures.items():
                    logger.log_image(key=key, images=[path], step=step)
        log.info("zero-shot evaluation at step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in scalars.items()))
        return metrics

    def flatten(self, metrics: dict, out_dir: str) -> tuple[dict, dict]:
        """metrics.json content -> ({<prefix>/<task>/<dataset>/<metric>: float}, {<prefix>/<task>/<figure
        stem>: file in out_dir}); the mean over datasets as dataset "mean" when there are several."""
        scalars, figures = {}, {}
        for task in task_names(self.cfg):
            sec = metrics[task]
            rows = dict(sec["datasets"])
            if len(rows) > 1:
                rows["mean"] = sec["mean"]
            for dname, m in rows.items():
                for k, v in m.items():
                    if isinstance(v, float):
                        scalars[f"{self.prefix}/{task}/{dname}/{k}"] = v
            for f in sec.get("figures", []):
                figures[f"{self.prefix}/{task}/{os.path.splitext(f)[0]}"] = os.path.join(out_dir, f)
        return scalars, figures
