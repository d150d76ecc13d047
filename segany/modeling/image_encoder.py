"""SAM's image encoder: timm's SAM ViT configured exactly like the release.

timm's `VisionTransformerSAM` has the release's structure and key names (except
`mlp.fc1/fc2` for the release's `mlp.lin1/lin2`, mapped in `checkpoint.py`) and runs
attention through `scaled_dot_product_attention` with the decomposed rel-pos as a bias.
Its blocks are built as `RelPosBlock` (timm's block with `RelPosAttention`, through
VisionTransformerSAM's `block_fn` argument). Written against timm 1.0 (pyproject pins the
tested minor range): the attention's `forward` reads timm's attribute names.
"""

from functools import partial
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.models.vision_transformer_sam import Attention, Block, VisionTransformerSAM, get_rel_pos


class RelPosAttention(Attention):
    """timm's SAM attention; when gradients are needed, the decomposed rel-pos bias is added in
    place to the scores instead of being materialised as an SDPA mask.

    With a bias that requires grad, ``scaled_dot_product_attention`` on the CPU falls back to its
    math path, and timm builds that bias as a (B*heads, N, N) tensor in a permuted layout that
    its reshape copies: at 1024 px (N = 4096 in the global blocks) two extra 805 MB passes, plus
    the math path's all-masked-row checks (isneginf / all / where), about a quarter of the
    encoder's training time. Here the same math: scores = (q * scale) k^T, + rel_h + rel_w
    broadcast in place, softmax, @ v. Without gradients (inference) timm's forward runs (the
    fused kernel takes the constant mask)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.use_rel_pos and torch.is_grad_enabled()):
            return super().forward(x)
        B, H, W, _ = x.shape
        N = H * W
        qkv = self.qkv(x.reshape(B, N, -1)).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, B * self.num_heads, N, -1).unbind(0)  # (B*heads, N, c) each
        q, k = self.q_norm(q), self.k_norm(k)
        r_q = q.reshape(-1, H, W, q.shape[-1])
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, get_rel_pos(H, H, self.rel_pos_h))  # (B*heads, H, W, H)
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, get_rel_pos(W, W, self.rel_pos_w))  # (B*heads, H, W, W)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).view(-1, H, W, H, W)  # (B*heads, N, N) scores
        attn = (attn + rel_h[..., None]).add_(rel_w[..., None, :]).view(-1, N, N)
        x = self.attn_drop(attn.softmax(dim=-1)) @ v  # (B*heads, N, c)
        x = x.view(B, self.num_heads, N, -1).transpose(1, 2).reshape(B, N, -1)
        return self.proj_drop(self.proj(x)).view(B, H, W, -1)


class RelPosBlock(Block):
    """timm's SAM block with `RelPosAttention`. timm's Block builds its `Attention` itself (it takes
    no attention class), so the block is built, then its attention replaced by a RelPosAttention
    of the same arguments that adopts the parameters timm initialised (built on the meta device:
    no second initialisation, and a seed gives the same weights as timm's own block)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        norm_layer=nn.LayerNorm,
        use_rel_pos: bool = False,
        window_size: int = 0,
        input_size=None,
        rope=None,
        **block_kwargs,
    ) -> None:
        attn_args = dict(
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            norm_layer=norm_layer,
            use_rel_pos=use_rel_pos,
            rope=rope,
        )
        super().__init__(dim, window_size=window_size, input_size=input_size, **attn_args, **block_kwargs)
        # the attention's own grid, as timm's Block passes it: the window, or the whole grid
        grid = input_size if window_size == 0 else (window_size, window_size)
        attn = RelPosAttention(dim, input_size=grid, **attn_args, device="meta")
        attn.load_state_dict(self.attn.state_dict(), assign=True)
        self.attn = attn


class ImageEncoderViT(VisionTransformerSAM):
    """(B, 3, S, S) normalised, padded image -> (B, out_chans, S/16, S/16) embedding.

    interm_index: the block whose output `forward_interm` also returns (HQ-SAM fuses the first
    global-attention block's); None for SAM."""

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
        interm_index: Optional[int] = None,
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
            block_fn=RelPosBlock,
            **timm_kwargs,
        )
        self.img_size = img_size
        self.out_chans = out_chans
        self.interm_index = interm_index
        self.set_grad_checkpointing(grad_checkpointing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)  # (B, out_chans, S/16, S/16)

    def forward_interm(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """-> the embedding (B, out_chans, S/16, S/16) and block `interm_index`'s output
        (B, embed_dim, S/16, S/16) (None when interm_index is None), in one pass."""
        if self.interm_index is None:
            return self.forward(x), None
        x, (interm,) = self.forward_intermediates(x, indices=[self.interm_index])
        return x, interm
