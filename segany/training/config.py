"""Hydra/OmegaConf helpers for train.py and evaluate.py: resolvers and early config checks."""
from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf


def register_resolvers() -> None:
    """${slurm_suffix:} -> "_<SLURM_JOB_ID>" inside a SLURM job (constant across requeues),
    "" otherwise."""
    if not OmegaConf.has_resolver("slurm_suffix"):
        OmegaConf.register_new_resolver(
            "slurm_suffix", lambda: f"_{os.environ['SLURM_JOB_ID']}" if os.environ.get("SLURM_JOB_ID") else "")


REQUIRED = ("model", "data", "trainer", "optim", "prompting", "loss", "module", "paths")


def check_train_config(cfg: DictConfig) -> None:
    """Fail before anything is built, naming the key."""
    for key in REQUIRED:
        if cfg.get(key) is None:
            raise ValueError(f"config: missing node '{key}' (see configs/train.yaml)")
    for key in ("model", "data", "trainer", "optim", "prompting", "loss", "module"):
        if "_target_" not in cfg[key]:
            raise ValueError(f"config: node '{key}' has no _target_")
    if OmegaConf.is_missing(cfg, "name"):
        raise ValueError("config: 'name' is not set (pick an experiment=..., or name=...)")
    for key, node in (cfg.get("callbacks") or {}).items():
        if node is not None and "_target_" not in node:
            raise ValueError(f"config: callbacks.{key} has no _target_")
    p = cfg.prompting
    if p.get("resolution") not in ("low", "full"):
        raise ValueError(f"config: prompting.resolution={p.get('resolution')!r}, expected 'low' or 'full'")
    img = cfg.data.get("img_size")
    if img is not None and cfg.model.get("img_size") is not None and img != cfg.model.img_size:
        raise ValueError(f"config: data.img_size={img} != model.img_size={cfg.model.img_size}")
