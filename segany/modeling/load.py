"""Load the model to evaluate (or to annotate with): a train.py checkpoint (the model is
rebuilt from the config stored in it), an official SAM .pth, or nothing (untrained)."""

from __future__ import annotations

import os
from typing import Optional

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf


def load_model(ckpt_path: Optional[str], model_cfg: Optional[DictConfig] = None, seed: int = 0):
    """-> (Sam, description). model_cfg (a configs/model/*.yaml node) builds the network
    when the checkpoint carries no config: an official .pth, or no checkpoint at all."""
    if ckpt_path is None:
        if model_cfg is None:
            raise ValueError("no ckpt_path and no model config: nothing to build")
        torch.manual_seed(seed)
        return instantiate(model_cfg), "untrained"
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such file")
    if ckpt_path.endswith(".pth"):
        if model_cfg is None:
            raise ValueError(f"{ckpt_path}: an official .pth needs the model config (which size)")
        return instantiate(model_cfg, checkpoint=ckpt_path), f"official {ckpt_path}"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{ckpt_path}: not a train.py checkpoint (no 'state_dict')")
    run_cfg = ckpt.get("segany_config")
    if run_cfg is None and model_cfg is None:
        raise ValueError(f"{ckpt_path}: carries no segany_config; give the model config")
    net_cfg = OmegaConf.create(run_cfg["model"]) if run_cfg else model_cfg
    model = instantiate(net_cfg, checkpoint=None, encoder_init=None)
    state = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    return model, f"{ckpt_path} (step {ckpt.get('global_step')})"
