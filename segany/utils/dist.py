"""Rank / world size and device choice for scripts that run outside Lightning's launcher
(evaluation, the data engine): from the config, else the launcher's environment (torchrun:
RANK / WORLD_SIZE, SLURM: SLURM_PROCID / SLURM_NTASKS)."""

from __future__ import annotations

import os
from typing import Optional

import torch


def topology(rank: Optional[int] = None, world_size: Optional[int] = None) -> tuple:
    env = os.environ
    if world_size is None:
        world_size = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    if rank is None:
        rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is not in a world of {world_size}")
    return int(rank), int(world_size)


def pick_device(name: str) -> torch.device:
    """ "auto" -> cuda when available, else cpu; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
