"""Load the model to evaluate (or to annotate with): any checkpoint `segany.modeling.reader`
reads (a train.py .ckpt, an FSDP checkpoint directory, a SAM .pth), rebuilt with the
architecture the checkpoint stores; or nothing (untrained)."""

from __future__ import annotations

from typing import Optional

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from segany.modeling.build import assemble, stored_config
from segany.modeling.checkpoint import load_weights
from segany.modeling.reader import read_checkpoint


def load_model(
    ckpt_path: Optional[str], model_cfg: Optional[DictConfig] = None, seed: int = 0, *, trust_checkpoint: bool = False
):
    """-> (Sam, description). model_cfg (a configs/model/*.yaml node) builds the network only
    when there is no checkpoint, or when its architecture can be neither read from it nor
    inferred from its shapes (weights that are not a whole SAM).
    `trust_checkpoint=True` lets this one checkpoint unpickle arbitrary objects."""
    if ckpt_path is None:
        if model_cfg is None:
            raise ValueError("no ckpt_path and no model config: nothing to build")
        torch.manual_seed(seed)
        return instantiate(model_cfg), "untrained"
    ck = read_checkpoint(ckpt_path, trust=trust_checkpoint)
    if ck.model_config is not None:
        model = assemble(stored_config(ck))
    elif model_cfg is None:
        raise ValueError(
            f"{ckpt_path}: stores no architecture (a release .pth has none); give the model config (e.g. model=vit_b)"
        )
    else:
        model = instantiate(model_cfg, checkpoint=None, encoder_init=None, lora=None)  # LoRA weights come merged
    load_weights(model, ck.state_dict, ck.path)
    return model, ck.description


def untrained_like(model, seed: int = 0):
    """A freshly initialised Sam of `model`'s architecture (the SamConfig build_sam / assemble keep
    as model.config: the checkpoint's stored or inferred one), seeded as load_model's untrained
    baseline: for a model of config C, the weights load_model(None, <C's model config>, seed) gives."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ValueError(f"{type(model).__name__} carries no .config (built outside build_sam): no untrained twin")
    torch.manual_seed(seed)
    return assemble(cfg)
