"""SAM's image encoder: timm's SAM ViT configured exactly like the release.

timm's `VisionTransformerSAM` has the release's structure and key names (except
`mlp.fc1/fc2` for the release's `mlp.lin1/lin2`, mapped in `checkpoint.py`) and runs
attention through `scaled_dot_product_attention` with the decomposed rel-pos as a bias.
"""

from functools import partial
from typing import Sequence

import torch
import torch.nn as nn
from timm.models.vision_transformer_sam import VisionTransformerSAM


class ImageEncoderViT(VisionTransformerSAM):
    """(B, 3, S, S) normalised, padded image -> (B, out_chans, S/16, S/16) embedding."""

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
        window_size: int = 14,
        out_chans: int = 256,
        drop_path_rate: float = 0.0,
        grad_checkpointing: bool = False,
        **timm_kwargs,
    ) -> None:
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=4.0,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),  # the release's eps (timm default 1e-5)
            act_layer=nn.GELU,
            use_abs_pos=True,
            use_rel_pos=True,
            window_size=window_size,
            global_attn_indexes=tuple(global_attn_indexes),
            neck_chans=out_chans,
            drop_path_rate=drop_path_rate,
            num_classes=0,
            global_pool="",
            **timm_kwargs,
        )
        self.img_size = img_size
        self.out_chans = out_chans
        self.set_grad_checkpointing(grad_checkpointing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)  # (B, out_chans, S/16, S/16)
