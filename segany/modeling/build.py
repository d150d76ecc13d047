"""`build_sam`: one code path for every size, from scratch, a checkpoint or MAE weights."""

import logging
from typing import Optional

import torch.nn as nn

from segany.modeling.checkpoint import load_mae_encoder, read_checkpoint
from segany.modeling.checkpoint.load import model_of
from segany.modeling.lora import add_lora, lora_spec
from segany.modeling.sam import Sam, assemble  # noqa: F401 (assemble re-exported)
from segany.modeling.variants import VARIANTS, SamConfig, sam_config  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


def build_sam(
    variant: Optional[str] = None,
    checkpoint: Optional[str] = None,
    encoder_init: Optional[str] = None,
    *,
    lora=None,
    trust_checkpoint: bool = False,
    **overrides,
) -> Sam:
    """Build SAM of size `variant` (default vit_b). `checkpoint` (a train.py .ckpt, an FSDP
    checkpoint directory, or a SAM .pth; see segany.modeling.checkpoint) loads the whole model
    strictly, with the architecture the checkpoint stores when it stores one (variant and
    overrides may then only repeat it; the training switches stay the caller's; text_embed_dim
    may add the text token to a checkpoint without one, freshly initialised).
    `encoder_init` loads MAE/timm ViT weights into the image encoder (pos-embed resized).
    `lora` ({rank, alpha, targets, dropout}, segany.modeling.lora.LoraSpec) then adds fresh
    LoRA adapters to the image encoder and freezes its other weights (a checkpoint that
    holds adapters is read merged, see segany.modeling.lora).
    `trust_checkpoint=True` lets this one checkpoint unpickle arbitrary objects."""
    if checkpoint is not None and encoder_init is not None:
        raise ValueError("pass either checkpoint= (whole SAM) or encoder_init= (MAE encoder), not both")
    spec = lora_spec(lora)  # bad keys fail before a large file is read
    asked = sam_config(variant or "vit_b", **overrides)  # bad names fail before a large file is read
    if checkpoint is None:
        model = assemble(asked)
    else:
        model = model_of(read_checkpoint(checkpoint, trust=trust_checkpoint), variant, **overrides)
    if encoder_init is not None:
        model.encoder_init_report = load_mae_encoder(model.image_encoder, encoder_init)
        log.info("MAE init from %s: %s", encoder_init, model.encoder_init_report)
    if spec is not None:
        add_lora(model.image_encoder, spec)
        model.lora = spec  # save_official merges with it
    return model


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
