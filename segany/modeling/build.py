"""`build_sam`: one code path for every size, from scratch, an official checkpoint or MAE weights."""

import logging
from dataclasses import asdict, replace
from typing import Optional

import torch.nn as nn

from segany.modeling.checkpoint import TRAINING_SWITCHES, CheckpointError, load_mae_encoder, load_weights
from segany.modeling.image_encoder import ImageEncoderViT
from segany.modeling.lora import add_lora, lora_spec
from segany.modeling.mask_decoder import MaskDecoder
from segany.modeling.prompt_encoder import TEXT_KEYS, PromptEncoder
from segany.modeling.reader import Checkpoint, read_checkpoint
from segany.modeling.sam import Sam
from segany.modeling.transformer import TwoWayTransformer
from segany.modeling.variants import VARIANTS, SamConfig  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


def sam_config(variant: str, **overrides) -> SamConfig:
    if variant not in VARIANTS:
        raise ValueError(f"unknown SAM variant {variant!r}; choose one of {sorted(VARIANTS)}")
    fields = asdict(VARIANTS[variant])
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown build_sam override(s) {unknown}; valid keys: {sorted(fields)}")
    fields.update(overrides)
    fields["global_attn_indexes"] = tuple(fields["global_attn_indexes"])
    bad = [i for i in fields["global_attn_indexes"] if not 0 <= i < fields["depth"]]
    if bad:
        raise ValueError(f"global_attn_indexes {bad} out of range for depth {fields['depth']}")
    return SamConfig(**fields)


def stored_config(ck: Checkpoint) -> SamConfig:
    """The architecture a checkpoint stores (its build_sam node; training switches and the
    LoRA adapters, merged by the reader, dropped)."""
    skip = ("checkpoint", "encoder_init", "lora", *TRAINING_SWITCHES)
    args = {k: v for k, v in ck.model_config.items() if k not in skip}
    try:
        return sam_config(args.pop("variant", None) or "vit_b", **args)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{ck.path!r}: its stored model config does not build a SAM: {e}") from e


_ENCODER_SIZE = ("embed_dim", "depth", "num_heads", "global_attn_indexes")


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
    # the text token may be added to a checkpoint without one (fresh weights; build_sam loads the rest)
    adds_text = overrides.get("text_embed_dim", 0) > 0 and stored.text_embed_dim == 0
    kept = TRAINING_SWITCHES + (("text_embed_dim",) if adds_text else ())
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
    checkpoint directory, or a SAM .pth; see segany.modeling.reader) loads the whole model
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
    sam_config(variant or "vit_b", **overrides)  # bad names fail before a large file is read
    ck = read_checkpoint(checkpoint, trust=trust_checkpoint) if checkpoint is not None else None
    model = assemble(config_for(ck, variant, overrides))
    if ck is not None:
        sd = ck.state_dict
        fresh = {k: v for k, v in model.state_dict().items() if k.startswith(TEXT_KEYS)}
        if fresh and not any(k.startswith(TEXT_KEYS) for k in sd):  # text token added: fresh, the rest strict
            log.info("%s has no text token: added with fresh weights", ck.path)
            sd = {**sd, **fresh}
        load_weights(model, sd, ck.path)
    if encoder_init is not None:
        model.encoder_init_report = load_mae_encoder(model.image_encoder, encoder_init)
        log.info("MAE init from %s: %s", encoder_init, model.encoder_init_report)
    if spec is not None:
        add_lora(model.image_encoder, spec)
        model.lora = spec  # save_official merges with it
    return model


def assemble(cfg: SamConfig) -> Sam:
    """A freshly initialised `Sam` of architecture `cfg`."""
    grid = cfg.img_size // cfg.patch_size
    image_encoder = ImageEncoderViT(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        global_attn_indexes=cfg.global_attn_indexes,
        window_size=cfg.window_size,
        out_chans=cfg.prompt_embed_dim,
        drop_path_rate=cfg.drop_path_rate,
        grad_checkpointing=cfg.grad_checkpointing,
    )
    prompt_encoder = PromptEncoder(
        embed_dim=cfg.prompt_embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(cfg.img_size, cfg.img_size),
        mask_in_chans=cfg.mask_in_chans,
        text_embed_dim=cfg.text_embed_dim,
    )
    transformer = TwoWayTransformer(
        depth=cfg.decoder_depth,
        embedding_dim=cfg.prompt_embed_dim,
        num_heads=cfg.decoder_heads,
        mlp_dim=cfg.decoder_mlp_dim,
        dropout=cfg.decoder_dropout,
    )
    mask_decoder = MaskDecoder(
        transformer_dim=cfg.prompt_embed_dim,
        transformer=transformer,
        num_multimask_outputs=cfg.num_multimask_outputs,
        iou_head_depth=cfg.iou_head_depth,
        iou_head_hidden_dim=cfg.iou_head_hidden_dim,
    )
    model = Sam(image_encoder, prompt_encoder, mask_decoder)
    model.config = cfg
    return model


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
