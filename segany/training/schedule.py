"""Learning-rate schedule: linear warmup, then step decay (SAM: 250 warmup iterations,
lr / 10 at 60k and 86,666 of 90k for ViT-H), and optionally a linear cooldown at the end
(warmup-stable-decay; off in the paper's recipes, used by the short CPU demo).

Used as a ``LambdaLR`` factor: each param group's lr = its own initial lr (base_lr times
its layer-decay scale, see optim.py) x ``WarmupStepDecay(step)``.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Sequence, Union


class WarmupStepDecay:
    """factor(step): ``start_factor`` -> 1 linearly over ``warmup_iters`` steps, then times
    ``gamma`` at each milestone passed (``gamma`` a number, or one factor per milestone,
    applied cumulatively). ``cooldown`` = (start, end): from step ``start`` to ``end`` the
    factor is further multiplied by a ramp falling linearly from 1 to ``cooldown_final``
    (and stays there after ``end``); empty = no cooldown. A class, not a lambda, so LambdaLR
    can checkpoint it."""

    def __init__(
        self,
        warmup_iters: int = 250,
        milestones: Sequence[int] = (),
        gamma: Union[float, Sequence[float]] = 0.1,
        start_factor: float = 0.0,
        cooldown: Sequence[int] = (),
        cooldown_final: float = 0.0,
    ):
        milestones = [int(m) for m in (milestones or ())]
        if milestones != sorted(milestones):
            raise ValueError(f"optim.milestones={milestones} must be increasing")
        if isinstance(gamma, (int, float)):
            gammas = [float(gamma)] * len(milestones)
        else:
            gammas = [float(g) for g in gamma]
            if len(gammas) != len(milestones):
                raise ValueError(f"optim.gamma={gammas}: one factor per milestone ({len(milestones)}) or a number")
        if warmup_iters < 0:
            raise ValueError(f"optim.warmup_iters={warmup_iters} must be >= 0")
        cooldown = [int(c) for c in (cooldown or ())]
        if cooldown and (len(cooldown) != 2 or not 0 <= cooldown[0] < cooldown[1]):
            raise ValueError(f"optim.cooldown={cooldown} must be [start, end] with 0 <= start < end (or empty)")
        if not 0 <= cooldown_final <= 1:
            raise ValueError(f"optim.cooldown_final={cooldown_final} must be in [0, 1]")
        self.cooldown = cooldown
        self.cooldown_final = float(cooldown_final)
        self.warmup_iters = int(warmup_iters)
        self.milestones = milestones
        self.gammas = gammas
        self.start_factor = float(start_factor)

    def __call__(self, step: int) -> float:
        f = 1.0
        if step < self.warmup_iters:
            f = self.start_factor + (1 - self.start_factor) * step / self.warmup_iters
        for g in self.gammas[: bisect_right(self.milestones, step)]:
            f *= g
        if self.cooldown and step > self.cooldown[0]:
            start, end = self.cooldown
            done = min(1.0, (step - start) / (end - start))
            f *= 1 - (1 - self.cooldown_final) * done
        return f
