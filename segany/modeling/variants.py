"""The released SAM sizes (and the tiny CPU one): every architectural number, by name. A module of its
own so that segany.modeling.infer can name a checkpoint's size without importing build."""

from dataclasses import dataclass
from typing import Tuple


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
