"""Sharded evaluation: each rank evaluates its share of a dataset and writes a part file;
rank 0 waits for all parts and merges them (or ``merge_only=true`` merges parts left by
an earlier, e.g. SLURM array, run). Rank and world size come from the config, else from
the launcher's environment (torchrun: RANK / WORLD_SIZE, SLURM: SLURM_PROCID / SLURM_NTASKS).
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

from segany.utils.io import atomic_write_json


def part_path(out_dir: str, task: str, dataset: str, rank: int, world: int) -> str:
    return os.path.join(out_dir, "parts", f"{task}.{dataset}.rank{rank:04d}-of-{world:04d}.json")


def write_part(
    out_dir: str, task: str, dataset: str, rank: int, world: int, payload: dict, fingerprint: Optional[str] = None
) -> str:
    """Write atomically, so that a waiting rank never reads half a part."""
    path = part_path(out_dir, task, dataset, rank, world)
    atomic_write_json(path, {"fingerprint": fingerprint, "payload": payload})
    return path


def _read(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def gather_parts(
    out_dir: str, task: str, dataset: str, world: int, timeout_s: float = 0.0, fingerprint: Optional[str] = None
) -> list:
    """All `world` parts' payloads, in rank order; waits up to timeout_s for missing ones. A part
    written by another evaluation (a different fingerprint: config or checkpoint) counts as missing."""
    paths = [part_path(out_dir, task, dataset, r, world) for r in range(world)]
    deadline = time.time() + timeout_s
    while True:
        parts = [_read(p) for p in paths]
        missing = [
            p
            for p, part in zip(paths, parts)
            if part is None or (fingerprint is not None and part.get("fingerprint") != fingerprint)
        ]
        if not missing:
            return [part["payload"] for part in parts]
        if time.time() >= deadline:
            raise FileNotFoundError(
                f"{len(missing)} of {world} parts of {task}/{dataset} missing or from another "
                f"evaluation, e.g. {missing[0]} (a rank failed, or raise merge_timeout_s)"
            )
        time.sleep(1.0)


def fingerprint(cfg, checkpoint: Optional[str]) -> str:
    """Identity of an evaluation: its config without the per-rank / merge keys, and the
    checkpoint file's size and modification time."""
    import hashlib

    from omegaconf import OmegaConf

    c = OmegaConf.to_container(cfg, resolve=False)  # as written: overrides show, no resolver runs
    for k in ("rank", "merge_only", "merge_timeout_s", "hydra"):
        c.pop(k, None)
    if checkpoint and os.path.isfile(checkpoint):
        st = os.stat(checkpoint)
        c["_ckpt"] = [st.st_size, st.st_mtime_ns]
    return hashlib.sha1(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:16]
