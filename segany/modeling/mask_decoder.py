"""SAM's mask decoder, batched over images and prompts.

Prompts come grouped per image: with B image embeddings and N = B*M prompt rows, rows
b*M .. b*M+M-1 are decoded against image b, in one call with no loop over images or
prompts (B == 1 broadcasts to every row, as in the release).
"""
from typing import Tuple, Type

import torch
import torch.nn as nn

from .common import MLP, LayerNorm2d


class MaskDecoder(nn.Module):
    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        activation: Type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1  # token 0: single-mask output
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        c = transformer_dim
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(c, c // 4, kernel_size=2, stride=2),
            LayerNorm2d(c // 4),
            activation(),
            nn.ConvTranspose2d(c // 4, c // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(c, c, c // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(c, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> masks (N, K, 4h, 4w) logits, iou_pred (N, K); K = 3 with multimask_output else 1."""
        masks, iou_pred = self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings,
                                             dense_prompt_embeddings)
        sel = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sel], iou_pred[:, sel]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,  # (B, C, h, w)
        image_pe: torch.Tensor,  # (1, C, h, w)
        sparse_prompt_embeddings: torch.Tensor,  # (N, T, C), N = B*M
        dense_prompt_embeddings: torch.Tensor,  # (N, C, h, w)
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """All mask tokens -> masks (N, 4, 4h, 4w), iou_pred (N, 4)."""
        n = sparse_prompt_embeddings.shape[0]
        b, c, h, w = image_embeddings.shape
        if n % b != 0:
            raise ValueError(f"{n} prompt rows cannot be grouped over {b} images")
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)  # (5, C)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(n, -1, -1).to(sparse_prompt_embeddings.dtype),
                            sparse_prompt_embeddings], dim=1)  # (N, 5+T, C)

        # every prompt row gets its own copy of its image's embedding (the transformer updates it)
        src = image_embeddings if n == b else image_embeddings.repeat_interleave(n // b, dim=0)
        src = src + dense_prompt_embeddings  # (N, C, h, w)
        hs, src = self.transformer(src, image_pe, tokens)  # (N, 5+T, C), (N, hw, C)
        iou_token_out = hs[:, 0]
        mask_tokens_out = hs[:, 1:1 + self.num_mask_tokens]  # (N, 4, C)

        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(n, c, h, w))  # (N, C/8, 4h, 4w)
        hyper_in = torch.stack([mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
                               dim=1)  # (N, 4, C/8)
        _, c8, hh, ww = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(n, c8, hh * ww)).reshape(n, -1, hh, ww)
        iou_pred = self.iou_prediction_head(iou_token_out)
        return masks, iou_pred
