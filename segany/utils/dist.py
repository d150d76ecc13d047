"""Rank / world size, in one place for training data, evaluation and the data engine; and the
device choice for scripts that run outside Lightning."""

from __future__ import annotations

import os
from typing import Optional

import torch


def topology(rank: Optional[int] = None, world_size: Optional[int] = None, trainer=None) -> tuple[int, int]:
    """(global rank, world size). Each value not given explicitly comes from, in this order: the
    Lightning trainer when given (Lightning's own launcher sets no RANK), torch.distributed when
    initialised, the launcher's environment (torchrun: RANK / WORLD_SIZE, SLURM: SLURM_PROCID /
    SLURM_NTASKS), else rank 0 of 1."""
    if trainer is not None:
        found = int(trainer.global_rank), int(trainer.world_size)
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        found = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        env = os.environ
        found = int(env.get("RANK", env.get("SLURM_PROCID", 0))), int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    rank = found[0] if rank is None else int(rank)
    world_size = found[1] if world_size is None else int(world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is not in a world of {world_size}")
    return rank, world_size


def pick_device(name: str) -> torch.device:
    """ "auto" -> cuda when available, else cpu; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
