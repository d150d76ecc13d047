"""HQ-SAM (Ke et al., NeurIPS 2023, "Segment Anything in High Quality"): SAM's mask decoder with
one more output token, the HQ token, whose mask is read from an "HQ feature" instead of SAM's
upscaled embedding alone.

    hq_features = embedding_encoder(image embedding) + compress_vit_feat(early encoder features)
                                                            # per image, (B, C/8, 4h, 4w)
    HQ embedding = embedding_maskfeature(SAM's upscaled embedding) + hq_features   # per prompt row
    HQ mask      = hf_mlp(HQ token out) . HQ embedding                             # (N, 1, 4h, 4w)

The early features are the output of one encoder block (the release: the first global-attention
block), (B, embed_dim, h, w): `ImageEncoderViT.forward_interm`. The HQ parts keep the release's key
names (`mask_decoder.hf_token`, `hf_mlp`, `compress_vit_feat`, `embedding_encoder`,
`embedding_maskfeature`: `HQ_KEYS`), so HQ-SAM's released .pth files load as they are.

Outputs: `predict_masks` gives every token's mask, SAM's 4 then the HQ one, (N, 5, 4h, 4w), and
SAM's IoU predictions (N, 4) (the HQ token has none); `select` / `forward` combine them as the
release's predictor does: SAM's mask (token 0, or the best-IoU multimask token) + the HQ mask,
one mask per prompt, or the HQ mask alone with `hq_token_only`.
"""

from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import LayerNorm2d

from segany.modeling.common import MLP
from segany.modeling.mask_decoder import MaskDecoder, rows_to_image, scatter_rows, subpixel_logits

# the HQ parts' weights in a Sam (the release's names)
HQ_KEYS = tuple(
    f"mask_decoder.{m}."
    for m in ("hf_token", "hf_mlp", "compress_vit_feat", "embedding_encoder", "embedding_maskfeature")
)


class MaskDecoderHQ(MaskDecoder):
    def __init__(self, *, vit_dim: int, compress_dim: Optional[int] = None, hidden_dim: Optional[int] = None, **kw):
        """vit_dim: width of the early encoder features (the encoder's embed_dim); compress_dim:
        compress_vit_feat's hidden width (None: transformer_dim, the release); hidden_dim:
        embedding_encoder's and embedding_maskfeature's hidden width (None: transformer_dim // 4)."""
        super().__init__(**kw)
        c = self.transformer_dim
        compress_dim = c if compress_dim is None else compress_dim
        hidden_dim = c // 4 if hidden_dim is None else hidden_dim
        self.hf_token = nn.Embedding(1, c)
        self.hf_mlp = MLP(c, c, c // 8, 3)
        self.compress_vit_feat = nn.Sequential(  # (B, vit_dim, h, w) -> (B, C/8, 4h, 4w)
            nn.ConvTranspose2d(vit_dim, compress_dim, kernel_size=2, stride=2),
            LayerNorm2d(compress_dim),
            nn.GELU(),
            nn.ConvTranspose2d(compress_dim, c // 8, kernel_size=2, stride=2),
        )
        self.embedding_encoder = nn.Sequential(  # (B, C, h, w) -> (B, C/8, 4h, 4w)
            nn.ConvTranspose2d(c, hidden_dim, kernel_size=2, stride=2),
            LayerNorm2d(hidden_dim),
            nn.GELU(),
            nn.ConvTranspose2d(hidden_dim, c // 8, kernel_size=2, stride=2),
        )
        self.embedding_maskfeature = nn.Sequential(  # (N, C/8, 4h, 4w) -> same
            nn.Conv2d(c // 8, hidden_dim, 3, 1, 1),
            LayerNorm2d(hidden_dim),
            nn.GELU(),
            nn.Conv2d(hidden_dim, c // 8, 3, 1, 1),
        )

    def output_tokens(self) -> torch.Tensor:
        """IoU, SAM's mask tokens, then the HQ token: (1+4+1, C)."""
        return torch.cat([self.iou_token.weight, self.mask_tokens.weight, self.hf_token.weight], dim=0)

    def hq_features(self, image_embeddings: torch.Tensor, interm_embeddings: torch.Tensor) -> torch.Tensor:
        """Image embedding (B, C, h, w) + early encoder features (B, vit_dim, h, w) -> (B, C/8, 4h, 4w).
        Per image: computed once for all its prompts (SamPredictor computes it once per call)."""
        return self.embedding_encoder(image_embeddings) + self.compress_vit_feat(interm_embeddings)

    def forward(
        self,
        image_embeddings: torch.Tensor,  # (B, C, h, w)
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        hq_token_only: bool = False,
        interm_embeddings: Optional[torch.Tensor] = None,  # (B, vit_dim, h, w)
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> masks (N, 1, 4h, 4w) logits, iou_pred (N, 1): see `select`."""
        masks, iou_pred = self.predict_masks(
            image_embeddings,
            image_pe,
            sparse_prompt_embeddings,
            dense_prompt_embeddings,
            interm_embeddings=interm_embeddings,
        )
        return self.select(masks, iou_pred, multimask_output, hq_token_only)

    def select(
        self, masks: torch.Tensor, iou_pred: torch.Tensor, multimask_output: bool, hq_token_only: bool = False
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """predict_masks' (N, 5, 4h, 4w), (N, 4) -> the release's HQ output (N, 1, 4h, 4w), (N, 1):
        SAM's mask (token 0; with multimask_output the multimask token of highest predicted IoU) +
        the HQ mask, or the HQ mask alone with hq_token_only; the IoU is that SAM token's."""
        if multimask_output:
            iou_pred, best = iou_pred[:, 1:].max(dim=1, keepdim=True)  # (N, 1) each
            sam = masks[:, 1:-1].gather(1, best[..., None, None].expand(-1, -1, *masks.shape[-2:]))  # (N, 1, ..)
        else:
            iou_pred, sam = iou_pred[:, :1], masks[:, :1]
        hq = masks[:, -1:]
        return (hq if hq_token_only else sam + hq), iou_pred

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,  # (B, C, h, w)
        image_pe: torch.Tensor,  # (1, C, h, w)
        sparse_prompt_embeddings: torch.Tensor,  # (N, T, C), N = B*M
        dense_prompt_embeddings: torch.Tensor,  # (N, C, h, w)
        keep: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        *,
        interm_embeddings: Optional[torch.Tensor] = None,  # (B, vit_dim, h, w)
        hq_features: Optional[torch.Tensor] = None,  # (B, C/8, 4h, 4w): hq_features(), computed already
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Every token -> masks (N, 5, 4h, 4w) (SAM's 4, then HQ), iou_pred (N, 4). Needs the early
        encoder features, or hq_features computed from them; `keep` as in MaskDecoder."""
        if hq_features is None:
            if interm_embeddings is None:
                raise ValueError(
                    "an HQ-SAM decoder needs the early encoder features: pass interm_embeddings "
                    "(ImageEncoderViT.forward_interm) or hq_features"
                )
            hq_features = self.hq_features(image_embeddings, interm_embeddings)
        n = sparse_prompt_embeddings.shape[0]
        b, _, h, w = image_embeddings.shape
        hs, src, iou_pred, rows = self.run_transformer(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, keep
        )
        x = self.upscaled_rows(src)  # (R, 16hw, C/8): SAM's upscaled embedding, sub-pixel order
        masks_sam = subpixel_logits(x, self.hypernetworks(hs), h, w)  # (R, 4, 4h, 4w)
        hyper_hq = self.hf_mlp(hs[:, 1 + self.num_mask_tokens])  # (R, C/8)
        if b == 1:
            feat = hq_features  # (1, C/8, 4h, 4w), broadcast over the rows
        else:  # row r belongs to image r // M
            row = torch.arange(n, device=hs.device) if rows is None else rows
            feat = hq_features[row // (n // b)]  # (R, C/8, 4h, 4w)
        emb_hq = self.embedding_maskfeature(rows_to_image(x, h, w)) + feat  # (R, C/8, 4h, 4w)
        masks_hq = (hyper_hq.unsqueeze(1) @ emb_hq.flatten(2)).view(-1, 1, 4 * h, 4 * w)  # (R, 1, 4h, 4w)
        return scatter_rows(torch.cat([masks_sam, masks_hq], dim=1), rows, n), iou_pred
