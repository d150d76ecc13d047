"""Learning-rate schedule: linear warmup, then step decay (SAM: 250 warmup iterations,
lr / 10 at 2/3 and 26/27 of the run, i.e. 60k and 86,666 of 90k for ViT-H), and optionally a
linear cooldown at the end (warmup-stable-decay; off in the paper's recipes, used by the
short CPU demo).

Milestones and the cooldown are fractions of the run length ``max_steps``, so the schedule
keeps its shape when only the run length changes (a time budget, a shorter test run); the
warmup is in steps (the paper's 250 iterations whatever the length). ``max_steps`` is an
attribute: SamModule sets it from ``trainer.max_steps`` before every scheduler step, so a
run shrunk while it trains (segany.callbacks.TimeBudget) takes the schedule with it.

Used as a ``LambdaLR`` factor: each param group's lr = its own initial lr (base_lr times
its layer-decay scale, see optim.py) x ``WarmupStepDecay(step)``.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from typing import List, Optional, Sequence, Union


class WarmupStepDecay:
    """factor(step): ``start_factor`` -> 1 linearly over ``warmup_iters`` steps (None: 1 /
    warmup_iters, so step 0 already updates; with 0, step 0 is an update with lr 0), then times
    ``gamma`` at each milestone passed (``gamma`` a number, or one factor per milestone,
    applied cumulatively). ``milestones``: fractions of ``max_steps`` in (0, 1]; milestone
    step = floor(fraction x max_steps). ``cooldown`` = (start, end) fractions: from step
    floor(start x max_steps) to floor(end x max_steps) the factor is further multiplied by a
    ramp falling linearly from 1 to ``cooldown_final`` (and stays there after the end);
    empty = no cooldown. ``max_steps`` may stay None only without milestones and cooldown
    (set it with ``set_max_steps``, which fails, naming the keys, while it is needed and unset).
    A class, not a lambda, so LambdaLR can checkpoint it (its attributes are plain data)."""

    def __init__(
        self,
        warmup_iters: int = 250,
        milestones: Sequence[float] = (),
        gamma: Union[float, Sequence[float]] = 0.1,
        start_factor: Optional[float] = None,
        cooldown: Sequence[float] = (),
        cooldown_final: float = 0.0,
        max_steps: Optional[int] = None,
    ):
        fracs = [float(m) for m in (milestones or ())]
        if fracs != sorted(fracs) or any(not 0 < m <= 1 for m in fracs):
            raise ValueError(
                f"optim.milestones={fracs} must be increasing fractions of trainer.max_steps in (0, 1] "
                f"(e.g. [0.6666667, 0.962963] = 60k and 86,666 of 90k steps)"
            )
        if isinstance(gamma, (int, float)):
            gammas = [float(gamma)] * len(fracs)
        else:
            gammas = [float(g) for g in gamma]
            if len(gammas) != len(fracs):
                raise ValueError(f"optim.gamma={gammas}: one factor per milestone ({len(fracs)}) or a number")
        if warmup_iters < 0:
            raise ValueError(f"optim.warmup_iters={warmup_iters} must be >= 0")
        cooldown = [float(c) for c in (cooldown or ())]
        if cooldown and (len(cooldown) != 2 or not 0 <= cooldown[0] < cooldown[1] <= 1):
            raise ValueError(
                f"optim.cooldown={cooldown} must be [start, end] fractions of trainer.max_steps "
                f"with 0 <= start < end <= 1 (or empty)"
            )
        if not 0 <= cooldown_final <= 1:
            raise ValueError(f"optim.cooldown_final={cooldown_final} must be in [0, 1]")
        self.warmup_iters = int(warmup_iters)
        if start_factor is None:
            start_factor = 1.0 / warmup_iters if warmup_iters else 1.0
        if not 0 <= start_factor <= 1:
            raise ValueError(f"optim.warmup_start_factor={start_factor} must be in [0, 1] (or null)")
        self.start_factor = float(start_factor)
        self.milestone_fracs = fracs
        self.gammas = gammas
        self.cooldown_fracs = cooldown
        self.cooldown_final = float(cooldown_final)
        self.max_steps = None if max_steps is None else int(max_steps)

    def set_max_steps(self, max_steps: Optional[int]) -> None:
        """The run length the fractions refer to (trainer.max_steps; -1 or None: unset)."""
        self.max_steps = None if max_steps is None or int(max_steps) <= 0 else int(max_steps)
        self._steps(0.0)  # fail now, not at the first milestone

    def _steps(self, frac: float) -> int:
        if self.max_steps is None and (self.milestone_fracs or self.cooldown_fracs):
            raise ValueError(
                f"optim.milestones={self.milestone_fracs} / optim.cooldown={self.cooldown_fracs} are "
                f"fractions of trainer.max_steps, which is unset (-1): set trainer.max_steps"
            )
        # floor, with the float error of e.g. 0.57 x 100 = 56.99999999999999 rounded away
        return math.floor(round(frac * (self.max_steps or 0), 6))

    @property
    def milestones(self) -> List[int]:
        """The milestone steps for the current max_steps."""
        return [self._steps(f) for f in self.milestone_fracs]

    @property
    def cooldown(self) -> List[int]:
        """[start, end] steps of the cooldown for the current max_steps ([] without one)."""
        if not self.cooldown_fracs:
            return []
        start, end = (self._steps(f) for f in self.cooldown_fracs)
        return [start, max(start + 1, end)]

    def __call__(self, step: int) -> float:
        f = 1.0
        if step < self.warmup_iters:
            f = self.start_factor + (1 - self.start_factor) * step / self.warmup_iters
        for g in self.gammas[: bisect_right(self.milestones, step)]:
            f *= g
        if self.cooldown_fracs:
            start, end = self.cooldown
            if step > start:
                done = min(1.0, (step - start) / (end - start))
                f *= 1 - (1 - self.cooldown_final) * done
        return f
