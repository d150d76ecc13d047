"""SAM's mask decoder, batched over images and prompts.

Prompts come grouped per image: with B image embeddings and N = B*M prompt rows, rows
b*M .. b*M+M-1 are decoded against image b, in one call with no loop over images or
prompts (B == 1 broadcasts to every row, as in the release).

The output upscaling (two stride-2, kernel-2 transposed convolutions with a LayerNorm and
GELUs between them) is evaluated in "sub-pixel" form: such a transposed convolution maps
each input pixel to its own 2x2 output block, and LayerNorm2d / GELU / the hypernetwork
product act on each pixel alone, so every image token is carried to its 4x4 block of
output pixels by plain matrix products on contiguous (N, hw, ...) tensors, and only the
final (N, 4, 4h, 4w) logits are rearranged into an image. Same parameters (the release's
`output_upscaling.*` keys) and the same function as running the module; on the CPU about
1.6x faster in training (no layout conversions between the convolutions and the GELUs).
"""

from typing import Callable, Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d

from segany.modeling.common import MLP


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
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        return self.select(masks, iou_pred, multimask_output)

    def select(
        self, masks: torch.Tensor, iou_pred: torch.Tensor, multimask_output: bool
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """predict_masks' every-token output -> forward's: tokens 1.. with multimask_output, else token 0."""
        sel = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sel], iou_pred[:, sel]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,  # (B, C, h, w)
        image_pe: torch.Tensor,  # (1, C, h, w)
        sparse_prompt_embeddings: torch.Tensor,  # (N, T, C), N = B*M
        dense_prompt_embeddings: torch.Tensor,  # (N, C, h, w)
        keep: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """All mask tokens -> masks (N, 4, 4h, 4w), iou_pred (N, 4).

        keep: iou_pred (N, 4) -> (N,) bool. When given, the masks (the upscaling, a quarter of
        the decoder's work) are computed only for the kept rows, the others are NaN: a filter
        on the predicted IoU (the automatic mask generator's first one) needs no mask."""
        hs, src, iou_pred, rows = self.run_transformer(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, keep
        )
        h, w = image_embeddings.shape[-2:]
        masks = self.upscale_masks(src, self.hypernetworks(hs), h, w)  # (N|R, 4, 4h, 4w)
        return scatter_rows(masks, rows, iou_pred.shape[0]), iou_pred

    def output_tokens(self) -> torch.Tensor:
        """The learned output tokens put before the prompt tokens: IoU, then the mask tokens, (1+4, C)."""
        return torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)

    def run_transformer(
        self,
        image_embeddings: torch.Tensor,  # (B, C, h, w)
        image_pe: torch.Tensor,  # (1, C, h, w)
        sparse_prompt_embeddings: torch.Tensor,  # (N, T, C), N = B*M
        dense_prompt_embeddings: torch.Tensor,  # (N, C, h, w)
        keep: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """-> output tokens hs (N|R, O+T, C), image tokens src (N|R, hw, C), iou_pred (N, 4), and the
        kept rows (R,) (None: every row); O = len(output_tokens())."""
        n = sparse_prompt_embeddings.shape[0]
        b, _, h, w = image_embeddings.shape
        if n % b != 0:
            raise ValueError(f"{n} prompt rows cannot be grouped over {b} images")
        output_tokens = self.output_tokens()  # (O, C)
        tokens = torch.cat(
            [output_tokens.unsqueeze(0).expand(n, -1, -1).to(sparse_prompt_embeddings.dtype), sparse_prompt_embeddings],
            dim=1,
        )  # (N, O+T, C)

        dense = dense_prompt_embeddings
        if b == 1 and (dense.shape[0] == 1 or dense.stride(0) == 0):
            # one image and one dense embedding for every row (no mask prompts: the release's
            # no_mask_embed, expanded): the rows share their image tokens until the first
            # image -> token attention, so the transformer takes them once, (1, C, h, w)
            src = image_embeddings + dense[:1]
        else:
            # every prompt row gets its own copy of its image's embedding (the transformer updates it)
            src = image_embeddings if n == b else image_embeddings.repeat_interleave(n // b, dim=0)
            src = src + dense  # (N, C, h, w)
        hs, src = self.transformer(src, image_pe, tokens)  # (N, O+T, C), (N, hw, C)
        iou_pred = self.iou_prediction_head(hs[:, 0])  # (N, 4)
        rows = None if keep is None else keep(iou_pred).nonzero()[:, 0]  # (R,)
        if rows is not None:
            hs, src = hs[rows], src[rows]
        return hs, src, iou_pred, rows

    def hypernetworks(self, hs: torch.Tensor) -> torch.Tensor:
        """Output tokens (N, O+T, C) -> the mask tokens' hypernetwork weights (N, 4, C/8)."""
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens]  # (N, 4, C)
        return torch.stack([mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)

    def upscale_masks(self, src: torch.Tensor, hyper_in: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Mask logits = hyper_in . output_upscaling(image tokens), per pixel, in sub-pixel form.

        src (N, hw, C) image tokens, hyper_in (N, K, C/8) -> (N, K, 4h, 4w); equal to
        ``hyper_in @ output_upscaling(src as (N, C, h, w))`` flattened over pixels."""
        return subpixel_logits(self.upscaled_rows(src), hyper_in, h, w)

    def upscaled_rows(self, src: torch.Tensor) -> torch.Tensor:
        """output_upscaling in sub-pixel form: image tokens (N, hw, C) -> (N, 16hw, C/8), row
        (token t = (i, j), block (a, b), sub-block (a2, b2)) = pixel (4i+2a+a2, 4j+2b+b2)."""
        up1, norm, act1, up2, act2 = self.output_upscaling
        x = _subpixel_convt(src, up1)  # (N, hw, 4, C/4)
        x = act1(F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps))
        return act2(_subpixel_convt(x.flatten(1, 2), up2)).flatten(1, 2)  # (N, hw*16, C/8)


def subpixel_logits(x: torch.Tensor, hyper_in: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Upscaled rows x (N, 16hw, C/8) (MaskDecoder.upscaled_rows) . hyper_in (N, K, C/8) -> (N, K, 4h, 4w)."""
    return rows_to_image(x @ hyper_in.transpose(1, 2), h, w)  # (N, hw*16, K) -> (N, K, 4h, 4w)


def rows_to_image(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Upscaled rows (N, 16hw, D) (MaskDecoder.upscaled_rows) -> the image (N, D, 4h, 4w) they hold."""
    n, d = x.shape[0], x.shape[-1]
    x = x.view(n, h, w, 2, 2, 2, 2, d)  # (N, i, j, a, b, a2, b2, D): pixel (4i+2a+a2, 4j+2b+b2)
    return x.permute(0, 7, 1, 3, 5, 2, 4, 6).reshape(n, d, 4 * h, 4 * w)


def scatter_rows(masks: torch.Tensor, rows: Optional[torch.Tensor], n: int) -> torch.Tensor:
    """Masks of the kept rows (R, ...) -> (n, ...), NaN in the rows not kept (rows None: as they are)."""
    if rows is None:
        return masks
    return masks.new_full((n, *masks.shape[1:]), float("nan")).index_copy_(0, rows, masks)


def _subpixel_convt(x: torch.Tensor, conv: nn.ConvTranspose2d) -> torch.Tensor:
    """A kernel-2 stride-2 transposed convolution on pixels given as rows: x (N, P, Cin) ->
    (N, P, 4, Cout), the 2x2 output block of each input pixel in (a, b) row-major order."""
    w = conv.weight  # (Cin, Cout, 2, 2)
    y = x @ w.permute(0, 2, 3, 1).reshape(w.shape[0], 4 * w.shape[1])  # (N, P, 4*Cout)
    y = y.view(*x.shape[:2], 4, w.shape[1])
    return y + conv.bias if conv.bias is not None else y
