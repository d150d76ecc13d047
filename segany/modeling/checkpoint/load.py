"""A checkpoint -> a model: the architecture it stores (or its shapes show), its weights
loaded strictly; a mismatch lists what does not fit.

`model_of` is the one path from a read checkpoint to a model: `build_sam(checkpoint=...)`
(configs/model/*.yaml: `model.checkpoint=`), `load_model` (evaluate.py, the data engine, the
annotation app) and export's check all go through it or its `config_for`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Dict, Optional

import torch
import torch.nn as nn

from segany.modeling.checkpoint.read import Checkpoint, read_checkpoint
from segany.modeling.checkpoint.trust import CheckpointError
from segany.modeling.hq import HQ_KEYS
from segany.modeling.prompt_encoder import TEXT_KEYS
from segany.modeling.sam import Sam, assemble
from segany.modeling.variants import TRAINING_SWITCHES, SamConfig, sam_config

if TYPE_CHECKING:
    from omegaconf import DictConfig

log = logging.getLogger(__name__)

# build_sam keywords a stored model node may hold that are not architecture
_NOT_ARCHITECTURE = ("checkpoint", "trust_checkpoint", "encoder_init", "lora", *TRAINING_SWITCHES)
_ENCODER_SIZE = ("embed_dim", "depth", "num_heads", "global_attn_indexes")
_HQ_FIELDS = ("hq_token", "hq_interm_block", "hq_compress_dim", "hq_hidden_dim")
# parts a request may add to a checkpoint that has none of them, freshly initialised:
# the config fields that add them, the model keys they bring, and what is logged
_ADDABLE = (
    (lambda cfg: cfg.text_embed_dim > 0, ("text_embed_dim",), TEXT_KEYS, "text token"),
    (lambda cfg: cfg.hq_token, _HQ_FIELDS, HQ_KEYS, "HQ-SAM parts (HQ training starts from SAM)"),
)


def check_fits(expected: Dict[str, torch.Tensor], given: Dict[str, torch.Tensor], path: str) -> None:
    """Raise, listing the missing / unexpected / wrongly shaped keys, unless `given` has
    exactly the keys and shapes of `expected` (a model's state dict, on any device)."""
    problems = {
        "missing": [k for k in expected if k not in given],
        "unexpected": [k for k in given if k not in expected],
        "wrong shape": [
            f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
            for k, v in given.items()
            if k in expected and v.shape != expected[k].shape
        ],
    }
    lines = []
    for title, keys in problems.items():
        if keys:
            shown = keys[:20] + ([f"... and {len(keys) - 20} more"] if len(keys) > 20 else [])
            lines.append(f"{len(keys)} {title} key(s):\n    " + "\n    ".join(shown))
    if lines:
        raise CheckpointError(
            f"the weights of {path!r} do not match the model (is it a SAM checkpoint of this size?):\n"
            + "\n".join(lines)
        )


def load_weights(model: nn.Module, state_dict: Dict[str, torch.Tensor], path: str) -> None:
    """Load segany-named weights into `model` strictly; a mismatch lists what does not fit."""
    check_fits(model.state_dict(), state_dict, path)
    model.load_state_dict(state_dict, strict=True)


def stored_config(ck: Checkpoint) -> SamConfig:
    """The architecture a checkpoint stores (its build_sam node; training switches and the
    LoRA adapters, merged by the reader, dropped)."""
    args = {k: v for k, v in ck.model_config.items() if k not in _NOT_ARCHITECTURE}
    try:
        return sam_config(args.pop("variant", None) or "vit_b", **args)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{ck.path!r}: its stored model config does not build a SAM: {e}") from e


def config_for(ck: Optional[Checkpoint], variant: Optional[str], overrides: dict) -> SamConfig:
    """The checkpoint's stored architecture when it has one (the request may only repeat it,
    and set the training switches), else `variant` + overrides."""
    asked = sam_config(variant or "vit_b", **overrides)
    if ck is None or ck.model_config is None:
        return asked
    stored = stored_config(ck)
    conflicts = [
        f"variant={variant} ({k}={getattr(asked, k)})"
        for k in _ENCODER_SIZE
        if variant is not None and getattr(asked, k) != getattr(stored, k)
    ][:1]
    # the text token / the HQ parts may be added to a checkpoint without them (fresh weights; the
    # rest loads strictly)
    kept = TRAINING_SWITCHES
    for has, fields, _, _ in _ADDABLE:
        if has(asked) and not has(stored):
            kept += fields
    conflicts += [
        f"{k}={getattr(asked, k)}" for k in overrides if k not in kept and getattr(asked, k) != getattr(stored, k)
    ]
    if conflicts:
        held = ", ".join(f"{k}={v}" for k, v in asdict(stored).items() if k not in TRAINING_SWITCHES)
        raise CheckpointError(
            f"{ck.path!r} stores its architecture ({held}); the model config contradicts it: "
            f"{', '.join(conflicts)}. Leave those keys out: the architecture comes from the checkpoint"
        )
    return replace(stored, **{k: v for k, v in overrides.items() if k in kept})


def model_of(ck: Checkpoint, variant: Optional[str] = None, **overrides) -> Sam:
    """The model of checkpoint `ck`: built with `config_for(ck, variant, overrides)`, its weights
    loaded strictly. A text token or HQ-SAM parts the model has and the checkpoint wholly lacks stay
    freshly initialised (a checkpoint with some of them and not all is refused, naming what is missing)."""
    model = assemble(config_for(ck, variant, overrides))
    sd = ck.state_dict
    for _, _, keys, what in _ADDABLE:
        fresh = {k: v for k, v in model.state_dict().items() if k.startswith(keys)}
        if fresh and not any(k.startswith(keys) for k in sd):
            log.info("%s has no %s: added with fresh weights", ck.path, what)
            sd = {**sd, **fresh}
    load_weights(model, sd, ck.path)
    return model


def load_model(
    checkpoint: Optional[str], model_cfg: Optional[DictConfig] = None, seed: int = 0, *, trust_checkpoint: bool = False
):
    """The model to evaluate or annotate with -> (Sam, description): any checkpoint
    `read_checkpoint` reads, rebuilt with the architecture it stores; or, with no checkpoint,
    `model_cfg` (a configs/model/*.yaml node) freshly initialised with `seed` ("untrained").
    model_cfg builds the network for a checkpoint only when its architecture can be neither
    read from it nor inferred from its shapes (weights that are not a whole SAM).
    `trust_checkpoint=True` lets this one checkpoint unpickle arbitrary objects."""
    # hydra only here: `import segany` stays free of it (tests/test_layers.py)
    from hydra.utils import instantiate

    if checkpoint is None:
        if model_cfg is None:
            raise ValueError("no checkpoint and no model config: nothing to build")
        torch.manual_seed(seed)
        return instantiate(model_cfg), "untrained"
    ck = read_checkpoint(checkpoint, trust=trust_checkpoint)
    if ck.model_config is not None:
        return model_of(ck), ck.description
    if model_cfg is None:
        raise ValueError(
            f"{checkpoint}: stores no architecture and its shapes show none (not a whole SAM?); "
            "give the model config (e.g. model=vit_b)"
        )
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
