"""Progress for terminals and for log files.

On a terminal Lightning's tqdm bar is the right display; written to a file (a SLURM log,
``python train.py > run.log``) the same bar appends a new frame every step, and a 10-minute
CPU demo leaves thousands of them. ``progress_bar`` picks by ``sys.stdout.isatty()``: the
tqdm bar on a terminal, else ``LineProgress``, one log line every ``every_n_steps`` optimiser
steps or ``every_s`` seconds, whichever comes first (and at the first and the last step):

    step 50/1400 (3%) | loss 1.0234 | lr 9.60e-04 | 0.385 s/step | train/iou_last 0.612 | 0:00:21 elapsed, ~0:08:40 left

loss is the mean of the training_step losses since the previous line, s/step the wall time
per optimiser step since then with validation left out; ``keys`` lists further entries of
``trainer.callback_metrics`` shown with their latest value. Each validation ends in one line
with its duration and its ``val/`` metrics, and a validation longer than ``every_s`` reports
its batch count every ``every_s`` seconds. The lines go through the ``logging`` module (Hydra
copies them into <run dir>/train.log); without a configured handler they are printed.

A ``ProgressBar`` subclass rather than a plain Callback so that Lightning treats it as the
trainer's progress bar (``trainer.progress_bar_callback``; only rank 0 writes).
"""

from __future__ import annotations

import datetime
import logging
import sys
import time
from typing import Optional, Sequence

import torch
from pytorch_lightning.callbacks import ProgressBar, TQDMProgressBar

log = logging.getLogger(__name__)

MODES = ("auto", "bar", "lines")


def progress_bar(
    mode: str = "auto",
    refresh_rate: int = 1,
    every_n_steps: int = 50,
    every_s: float = 60.0,
    keys: Sequence[str] = (),
) -> ProgressBar:
    """mode auto: the tqdm bar (refresh_rate) when stdout is a terminal, else LineProgress
    (every_n_steps, every_s, keys); bar / lines: that one regardless."""
    if mode not in MODES:
        raise ValueError(f"callbacks.progress_bar.mode={mode!r}: expected one of {MODES}")
    if mode == "bar" or (mode == "auto" and sys.stdout.isatty()):
        return TQDMProgressBar(refresh_rate=refresh_rate)
    return LineProgress(every_n_steps=every_n_steps, every_s=every_s, keys=keys)


def _clock() -> float:
    return time.perf_counter()


def _hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def _fmt(value) -> str:
    v = float(value)
    return f"{v:.3g}" if abs(v) >= 1000 or (v != 0 and abs(v) < 1e-2) else f"{v:.4g}"


class LineProgress(ProgressBar):
    """One line per ``every_n_steps`` steps or ``every_s`` seconds; see the module docstring."""

    def __init__(self, every_n_steps: int = 50, every_s: float = 60.0, keys: Sequence[str] = ()):
        super().__init__()
        if int(every_n_steps) < 1 or not float(every_s) > 0:
            raise ValueError(f"LineProgress: every_n_steps={every_n_steps} must be >= 1 and every_s={every_s} > 0")
        self.every_n_steps, self.every_s, self.keys = int(every_n_steps), float(every_s), list(keys)
        self._enabled = True
        self._loss_sum: Optional[torch.Tensor] = None  # summed on the loss's device: no sync per step
        self._loss_n = 0
        self._t_line: Optional[float] = None  # set while fitting

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _write(self, line: str) -> None:
        if log.isEnabledFor(logging.INFO) and log.hasHandlers():
            log.info(line)
        else:
            print(line, flush=True)

    # ---------------------------------------------------------------- training
    def on_train_start(self, trainer, pl_module):
        self._t_start = self._t_line = _clock()
        self._step_line = trainer.global_step  # a resumed run starts its first window here
        self._val_s = 0.0  # validation time inside the current window
        self._loss_sum, self._loss_n, self._first = None, 0, True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().float()
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._loss_n += 1
        step, now = trainer.global_step, _clock()
        n = self.every_n_steps  # lines at the multiples of n (and whenever every_s has passed)
        due = step // n > self._step_line // n or now - self._t_line >= self.every_s
        if step > self._step_line and (due or self._first):  # the first step: start-up cost, first loss
            self._train_line(trainer, now)

    def on_train_end(self, trainer, pl_module):
        if trainer.global_step > self._step_line:
            self._train_line(trainer, _clock())

    def _train_line(self, trainer, now: float) -> None:
        step, n = trainer.global_step, trainer.global_step - self._step_line
        per_step = (now - self._t_line - self._val_s) / n
        parts = [self._step_text(trainer)]
        if self._loss_n:
            parts.append(f"loss {self._loss_sum.item() / self._loss_n:.4f}")
        if trainer.optimizers:
            parts.append(f"lr {max(g['lr'] for g in trainer.optimizers[0].param_groups):.2e}")
        parts.append(f"{per_step:.3f} s/step")
        metrics = trainer.callback_metrics
        parts += [f"{k} {_fmt(metrics[k])}" for k in self.keys if k in metrics]
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            parts.append(f"gpu mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        timing = f"{_hms(now - self._t_start)} elapsed"
        if trainer.max_steps and trainer.max_steps > 0:
            timing += f", ~{_hms((trainer.max_steps - step) * per_step)} left"
        parts.append(timing)
        if self._enabled:
            self._write(" | ".join(parts))
        self._t_line, self._step_line, self._val_s = now, step, 0.0
        self._loss_sum, self._loss_n, self._first = None, 0, False

    @staticmethod
    def _step_text(trainer) -> str:
        step, total = trainer.global_step, trainer.max_steps
        if total and total > 0:
            return f"step {step}/{total} ({100 * step // total}%)"
        return f"step {step} (epoch {trainer.current_epoch})"

    # ---------------------------------------------------------------- validation
    def on_validation_start(self, trainer, pl_module):
        self._t_val = self._t_val_line = _clock()
        self._val_batches = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._val_batches += 1
        now = _clock()
        if now - self._t_val_line >= self.every_s and self._enabled and not trainer.sanity_checking:
            total = trainer.num_val_batches
            total = sum(total) if isinstance(total, list) else total
            of = f"/{int(total)}" if total and total != float("inf") else ""
            self._write(
                f"validation at step {trainer.global_step}: batch {self._val_batches}{of}, {_hms(now - self._t_val)}"
            )
            self._t_val_line = now

    def on_validation_end(self, trainer, pl_module):
        dt = _clock() - self._t_val
        if self._t_line is not None:
            self._val_s += dt  # left out of the training s/step
        if trainer.sanity_checking or not self._enabled:
            return
        metrics = trainer.callback_metrics
        vals = [f"{k} {_fmt(v)}" for k, v in sorted(metrics.items()) if k.startswith("val/")]
        head = f"validation at step {trainer.global_step}: {self._val_batches} batches in {dt:.1f} s"
        self._write(" | ".join([head, *vals]))
