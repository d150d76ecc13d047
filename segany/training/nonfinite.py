"""The non-finite guard: a training step whose loss or gradient norm is NaN or inf is skipped
and counted; ``max_consecutive`` of them in a row stop the run, before anything is written.

Config node ``module.nonfinite`` (configs/module/sam.yaml), on by default. SamModule calls
`NonFiniteGuard.images` with each micro-batch's image ids (``on_train_batch_start``),
`NonFiniteGuard.observe` with the loss Lightning back-propagates (``on_before_backward``) and
`NonFiniteGuard.check` once per optimiser step, from ``configure_gradient_clipping``:
Lightning calls that hook inside the optimiser's step closure, after the last accumulated
micro-batch's backward (gradients all-reduced under DDP, reduce-scattered under FSDP) and
before the update. ``check``

- computes the gradient norm (``torch.nn.utils.get_total_norm``, the norm that clipping
  computes; a DTensor under FSDP, made whole);
- sums one 2-element flag over the ranks (some micro-batch of this step had a non-finite loss
  on this rank; the norm is not finite), so every rank takes the same decision: a rank with a
  NaN loss whose gradients happen to be finite would otherwise step alone and diverge;
- on a skip, drops the gradients (``optimizer.zero_grad(set_to_none=True)``): torch's optimisers,
  fused AdamW included, leave a parameter whose ``grad`` is None untouched, so the weights,
  the moments and the per-parameter step counts stay as they were. Lightning still counts the
  step (``global_step`` advances, the lr schedule with it, as after any step) and the data
  moves on: the batch is dropped, not retried.

A skip is logged (rank 0, a warning) with every rank's image ids of the step (gathered only
then) and counted: ``skipped`` (the run's total, logged as ``train/skipped_nonfinite``) and
``consecutive`` travel in checkpoints, so a resumed run continues both. The ``max_consecutive``-th
skip in a row raises `NonFiniteError` on every rank, from inside the step: ModelCheckpoint and
train.py's final save never run after it, and the checkpoints on disk hold finite weights (one
written during a run of skips holds the weights from before it, and the counters). The last
line of defence is the save path: segany.training.checkpointing refuses to write a state dict
in which `first_nonfinite` finds a NaN or inf.

Why hand-written: Lightning skips non-finite steps only through fp16's GradScaler (not a
precision of this project) and says nothing; ``clip_grad_norm_(error_if_nonfinite=True)``
stops at the first one, on each rank on its own. Cost per step: one more gradient norm, one
all-reduce of 2 floats and one host sync before the update.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """A run stopped by the guard, or a checkpoint refused for its non-finite weights."""


@dataclass
class NonFiniteGuard:
    """enabled: check every step. max_consecutive: this many skipped steps in a row stop the run."""

    enabled: bool = True
    max_consecutive: int = 3
    skipped: int = field(default=0, init=False)
    consecutive: int = field(default=0, init=False)
    grad_norm: Optional[torch.Tensor] = field(default=None, init=False, repr=False)  # the last step's

    def __post_init__(self):
        if int(self.max_consecutive) < 1:
            raise ValueError(f"module.nonfinite.max_consecutive={self.max_consecutive!r}: must be >= 1")
        self.max_consecutive = int(self.max_consecutive)
        self._loss_bad: Optional[torch.Tensor] = None  # over the micro-batches of the step being accumulated
        self._ids: list = []

    def images(self, image_ids) -> None:
        """One micro-batch's image ids (the batch's ``image_id``), named if the step is skipped."""
        if self.enabled:
            self._ids.extend(str(i) for i in (image_ids or ()))

    def observe(self, loss: torch.Tensor) -> None:
        """One micro-batch's loss (no host sync)."""
        if self.enabled:
            bad = ~torch.isfinite(loss.detach()).all()
            self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad

    def check(self, module, optimizer) -> bool:
        """After backward, before the update: True (gradients dropped) when the step is skipped."""
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=module.device)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
        loss_bad = torch.zeros((), dtype=torch.bool) if self._loss_bad is None else self._loss_bad
        ids, self._loss_bad, self._ids = self._ids, None, []
        self.grad_norm = norm.detach()
        flags = torch.stack([loss_bad.to(norm.device).float(), (~torch.isfinite(norm)).float()])
        trainer = module.trainer
        if trainer.world_size > 1:
            flags = trainer.strategy.reduce(flags, reduce_op="sum")
        n_loss, norm_bad = flags.tolist()
        if not (n_loss or norm_bad):
            self.consecutive = 0
            return False
        optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        self.consecutive += 1
        ranks = _gather((bool(loss_bad), ids), trainer.world_size)
        what = []
        if n_loss:
            what.append(f"loss not finite on rank(s) {[r for r, (bad, _) in enumerate(ranks) if bad]}")
        if norm_bad:
            what.append(f"gradient norm {float(norm)}")
        images = "; ".join(f"rank {r}: {rank_ids}" for r, (_, rank_ids) in enumerate(ranks))
        step = module.global_step
        if trainer.global_rank == 0:
            log.warning(
                "step %d skipped (no update): %s; images %s; %d skipped in this run, %d in a row",
                step, ", ".join(what), images, self.skipped, self.consecutive,
            )  # fmt: skip
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"module.nonfinite: stopping at step {step}: {self.consecutive} steps in a row skipped "
                f"(max_consecutive={self.max_consecutive}), the last with {', '.join(what)} (images {images}). "
                "Nothing is saved after this step; the checkpoints on disk hold finite weights (a skipped "
                "step leaves them as they were). "
                "Check those images, lower optim.lr, or raise module.nonfinite.max_consecutive."
            )
        return True

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state.get("skipped", 0))
        self.consecutive = int(state.get("consecutive", 0))


def _gather(obj, world_size: int) -> list:
    """Every rank's `obj` (only on a skip, which all ranks take together)."""
    if world_size <= 1 or not dist.is_available() or not dist.is_initialized():
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def first_nonfinite(state_dict: dict) -> Optional[str]:
    """The first key of `state_dict` whose floating tensor holds a NaN or inf (a DTensor: this
    rank's shard), with the counts; None when all are finite."""
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor) or not (value.is_floating_point() or value.is_complex()):
            continue
        local = value.to_local() if hasattr(value, "to_local") else value
        finite = torch.isfinite(local)
        if not bool(finite.all()):
            nan = int(torch.isnan(local).sum())
            return f"{key} ({nan} NaN, {int((~finite).sum()) - nan} inf of {local.numel()} values)"
    return None
