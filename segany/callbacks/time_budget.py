"""TimeBudget: fit a run planned in steps into ``trainer.max_time``.

A run is planned in steps (``trainer.max_steps``; the lr milestones and cooldown are
fractions of it, see segany/training/schedule.py). When it must also end within a
wall-clock budget (the CPU demo promises 10 minutes), the Timer that ``max_time`` installs
simply stops it wherever it is, which on a slow machine is before the lr drops: the end of
the schedule, where most of the final accuracy comes from, never runs. This callback
shrinks the plan instead: from the wall time per step so far (validation included), it
estimates how many steps fit in the budget and sets ``max_steps`` to that (never above the
plan). The schedule follows ``max_steps`` by itself (SamModule re-reads it before every
scheduler step), so it keeps its shape on any machine; a milestone already passed stays
passed (its fraction of a shorter run is earlier still).

It re-estimates every ``every`` steps (machine speed drifts). Without ``max_time`` or
``max_steps`` it does nothing. The result depends on the machine's speed: a run under a
time budget is not step-for-step reproducible elsewhere (large-scale recipes leave
max_time unset). The shrunk max_steps travels in checkpoints, so a resumed run keeps it.
"""

from __future__ import annotations

import logging
from typing import Optional

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Timer

log = logging.getLogger(__name__)


class TimeBudget(pl.Callback):
    """calibrate_steps: first estimate after this many steps; every: re-estimate period
    (steps); reserve_s: seconds kept free at the end (final checkpoint, tear-down)."""

    def __init__(self, calibrate_steps: int = 30, every: int = 25, reserve_s: float = 10.0):
        if calibrate_steps < 1 or every < 1:
            raise ValueError(f"TimeBudget: calibrate_steps={calibrate_steps} and every={every} must be >= 1")
        self.calibrate_steps, self.every, self.reserve_s = int(calibrate_steps), int(every), float(reserve_s)
        self.planned: Optional[int] = None  # max_steps of the plan
        self.max_steps: Optional[int] = None  # the current (shrunk) plan, for resumes

    @staticmethod
    def _timer(trainer) -> Optional[Timer]:
        return next((c for c in trainer.callbacks if isinstance(c, Timer)), None)

    def on_train_start(self, trainer, pl_module):
        if self.planned is None:  # fresh start (a resume restores it)
            self.planned = trainer.max_steps
        elif self.max_steps and 0 < self.max_steps < trainer.max_steps:  # resumed: the shrunk plan
            trainer.fit_loop.epoch_loop.max_steps = self.max_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step < self.calibrate_steps or (step - self.calibrate_steps) % self.every:
            return
        timer = self._timer(trainer)
        if timer is None or timer.time_remaining() is None or not self.planned or self.planned < 0:
            return
        per_step = timer.time_elapsed() / step  # s/step, validation and resumes included
        fits = step + max(0.0, timer.time_remaining() - self.reserve_s) / per_step
        new_max = min(self.planned, max(step, int(fits)))  # step: stop now
        new_max = int(trainer.strategy.broadcast(new_max))  # every rank takes rank 0's plan
        if new_max != trainer.max_steps:
            log.info(
                "TimeBudget: %.3f s/step, max_steps %d -> %d of %d planned",
                per_step,
                trainer.max_steps,
                new_max,
                self.planned,
            )
            trainer.fit_loop.epoch_loop.max_steps = self.max_steps = new_max

    def state_dict(self):
        return {"planned": self.planned, "max_steps": self.max_steps}

    def load_state_dict(self, state_dict):
        self.planned, self.max_steps = state_dict["planned"], state_dict.get("max_steps")
