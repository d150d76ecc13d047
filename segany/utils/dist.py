"""Rank / world size and the launcher's layout, in one place for training (Lightning's devices /
num_nodes), training data, evaluation and the data engine; and the device choice for scripts
that run outside Lightning."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Launch:
    """The processes a launcher started: this one's global rank and the world size; processes
    per node and nodes (Lightning's `devices` and `num_nodes`; None where the launcher says none)."""

    launcher: str  # "torchrun" | "slurm" | "env"
    rank: int
    world_size: int
    per_node: Optional[int] = None
    nodes: Optional[int] = None


def launcher() -> Optional[Launch]:
    """The launcher that started this process, detected as Lightning detects it, so that the
    layout passes its checks, else None. In this order:

      torchrun  TORCHELASTIC_RUN_ID and LOCAL_WORLD_SIZE set: RANK of WORLD_SIZE, LOCAL_WORLD_SIZE
                per node, WORLD_SIZE / LOCAL_WORLD_SIZE nodes (Lightning checks devices x
                num_nodes == WORLD_SIZE);
      slurm     SLURM_NTASKS set and the job not named bash / interactive (Lightning ignores an
                interactive allocation): SLURM_PROCID of SLURM_NTASKS; SLURM_NTASKS_PER_NODE,
                else SLURM_NTASKS / nodes, per node; SLURM_NNODES or SLURM_JOB_NUM_NODES nodes
                (Lightning checks devices == SLURM_NTASKS_PER_NODE, num_nodes == SLURM_NNODES);
      env       RANK and WORLD_SIZE alone (torch.distributed's env:// convention): no node layout.
    """
    env = os.environ
    if env.get("TORCHELASTIC_RUN_ID") is not None and "LOCAL_WORLD_SIZE" in env:
        local, world = int(env["LOCAL_WORLD_SIZE"]), int(env.get("WORLD_SIZE", env["LOCAL_WORLD_SIZE"]))
        if local < 1 or world % local:
            raise ValueError(f"torchrun: WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local}")
        return Launch("torchrun", int(env.get("RANK", 0)), world, local, world // local)
    if "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        ntasks = int(env["SLURM_NTASKS"])
        nodes = int(env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES") or 1)
        per_node = env.get("SLURM_NTASKS_PER_NODE")
        if per_node:  # "8", or "8(x4)" for 4 nodes of 8 tasks
            m = re.match(r"\d+", per_node)
            if m is None:
                raise ValueError(f"SLURM_NTASKS_PER_NODE={per_node!r}: expected a number of tasks")
            per_node = int(m.group())
        elif ntasks % nodes:
            raise ValueError(f"SLURM: {ntasks} tasks do not split evenly over {nodes} nodes; set --ntasks-per-node")
        else:
            per_node = ntasks // nodes
        return Launch("slurm", int(env.get("SLURM_PROCID", 0)), ntasks, per_node, nodes)
    if "RANK" in env and "WORLD_SIZE" in env:
        return Launch("env", int(env["RANK"]), int(env["WORLD_SIZE"]))
    return None


def topology(rank: Optional[int] = None, world_size: Optional[int] = None, trainer=None) -> tuple[int, int]:
    """(global rank, world size). Each value not given explicitly comes from, in this order: the
    Lightning trainer when given (Lightning's own launcher sets no RANK), torch.distributed when
    initialised, the launcher (`launcher`, the rules training follows), else rank 0 of 1."""
    if trainer is not None:
        found = int(trainer.global_rank), int(trainer.world_size)
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        found = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        launch = launcher()
        found = (0, 1) if launch is None else (launch.rank, launch.world_size)
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
