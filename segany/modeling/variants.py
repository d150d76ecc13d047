"""The released SAM sizes (and the tiny CPU one): every architectural number, by name, and
`sam_config(variant, **overrides)`. A module of its own, below the checkpoint package (which
names a checkpoint's size and rebuilds its architecture) and build_sam (which reads checkpoints)."""

from dataclasses import asdict, dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class SamConfig:
    """Every architectural number; `build_sam(variant, **overrides)` replaces any of them."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: Tuple[int, ...]
    img_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    # segany's text prompt (SAM paper §7.5): width of the CLIP embedding given as a prompt token;
    # 0 = off (the release's architecture; official checkpoints load unchanged)
    text_embed_dim: int = 0
    # HQ-SAM (Ke et al. 2023): an extra output token whose mask reads the SAM decoder's upscaled
    # embedding fused with early encoder features (segany.modeling.hq). False = the release's SAM.
    # None below = the HQ-SAM release's value: the first global-attention block's output is fused;
    # compress_vit_feat's hidden width = prompt_embed_dim; embedding_encoder's / embedding_maskfeature's
    # hidden width = prompt_embed_dim // 4. (The fused features' width is the encoder's embed_dim.)
    hq_token: bool = False
    hq_interm_block: Optional[int] = None
    hq_compress_dim: Optional[int] = None
    hq_hidden_dim: Optional[int] = None
    # training switches (the release has none; the paper uses drop path and decoder dropout 0.1)
    drop_path_rate: float = 0.0
    decoder_dropout: float = 0.0
    grad_checkpointing: bool = False


VARIANTS = {
    "vit_b": SamConfig(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": SamConfig(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": SamConfig(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
    # for CPU tests and the demo: 256 px -> 16x16 tokens, low-res masks 64x64
    "vit_tiny": SamConfig(embed_dim=192, depth=6, num_heads=3, global_attn_indexes=(2, 5), img_size=256, window_size=8),
}

# SamConfig fields that are training switches, not architecture: never stored as the
# architecture of a checkpoint, always the caller's own
TRAINING_SWITCHES = ("drop_path_rate", "decoder_dropout", "grad_checkpointing")


def sam_config(variant: str, **overrides) -> SamConfig:
    """VARIANTS[variant] with `overrides` replacing any of its fields; unknown names fail."""
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
    block = fields["hq_interm_block"]
    if block is not None and not 0 <= block < fields["depth"]:
        raise ValueError(f"hq_interm_block {block} out of range for depth {fields['depth']}")
    return SamConfig(**fields)


def hq_dims(cfg: SamConfig) -> Tuple[int, int, int]:
    """-> (encoder block whose output HQ-SAM fuses, compress_vit_feat hidden width, embedding_encoder /
    embedding_maskfeature hidden width), the release's values where `cfg` leaves them None."""
    block = cfg.hq_interm_block
    if block is None:
        if not cfg.global_attn_indexes:
            raise ValueError("hq_token=True with no global-attention block: set hq_interm_block")
        block = cfg.global_attn_indexes[0]
    compress = cfg.prompt_embed_dim if cfg.hq_compress_dim is None else cfg.hq_compress_dim
    hidden = cfg.prompt_embed_dim // 4 if cfg.hq_hidden_dim is None else cfg.hq_hidden_dim
    return block, compress, hidden
