"""Shared helpers for the inference parity tests: a tiny official SAM and a test image."""

from __future__ import annotations

from functools import partial

import cv2
import numpy as np
import torch
from torch import nn


def build_official_tiny_sam(seed: int = 0):
    """Official ``segment_anything`` Sam with the ``vit_tiny`` geometry (256 px input,
    16x16 embedding, 64x64 low-res masks), random weights from ``seed``.

    The zero-initialised encoder parameters (abs/rel position embeddings) are
    randomised too, so that loading them is actually exercised.
    """
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=256,
            patch_size=16,
            embed_dim=192,
            depth=6,
            num_heads=3,
            mlp_ratio=4.0,
            out_chans=256,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            global_attn_indexes=(2, 5),
            window_size=8,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=256,
            image_embedding_size=(16, 16),
            input_image_size=(256, 256),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    with torch.no_grad():
        for name, p in sam.image_encoder.named_parameters():
            if name == "pos_embed" or "rel_pos" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return sam.eval()


def make_test_image(h: int = 200, w: int = 300, seed: int = 0) -> np.ndarray:
    """(h, w, 3) uint8 RGB: a textured background with a few filled shapes."""
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.uint8)
    img[:] = (40, 60, 50)
    img = np.clip(img.astype(np.int16) + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)
    cv2.rectangle(img, (20, 30), (110, 120), (220, 40, 40), thickness=-1)
    cv2.circle(img, (200, 70), 45, (40, 200, 60), thickness=-1)
    tri = np.array([[150, 190], [290, 190], [230, 110]], np.int32)
    cv2.fillPoly(img, [tri], (240, 230, 60))
    cv2.ellipse(img, (60, 165), (45, 20), 15, 0, 360, (60, 80, 230), thickness=-1)
    cv2.rectangle(img, (130, 20), (150, 180), (250, 250, 250), thickness=-1)
    return img


# --------------------------------------------------------------------------- blob model

_N_FREQ = 7  # frequencies of the positional encoding that carry the signal
_MARK = 128 + _N_FREQ  # cos channel of a zero-frequency column: 1 at every real point


def _pe_features(B: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[sin, cos] of the first _N_FREQ PE frequencies at normalised xy ``u`` (..., 2)
    -> (..., 2*_N_FREQ), exactly as the prompt encoder's random Fourier features."""
    theta = 2 * np.pi * ((2 * u - 1) @ B[:, :_N_FREQ])
    return torch.cat([theta.sin(), theta.cos()], dim=-1)


def _rotation(B: torch.Tensor, dx: float, dy: float) -> torch.Tensor:
    """(14, 14) linear map taking PE features at u to PE features at u + (dx, dy)."""
    phi = 4 * np.pi * (B[0, :_N_FREQ] * dx + B[1, :_N_FREQ] * dy)  # phase shift per frequency
    c, s = phi.cos(), phi.sin()
    n = _N_FREQ
    R = torch.zeros(2 * n, 2 * n)
    idx = torch.arange(n)
    R[idx, idx] = c  # sin' = sin c + cos s
    R[idx, n + idx] = s
    R[n + idx, n + idx] = c  # cos' = cos c - sin s
    R[n + idx, idx] = -s
    return R


def _pm(M: torch.Tensor) -> torch.Tensor:
    """Map on [f, -f] pairs: (2k, 2k) from a (k, k) map of f."""
    return torch.cat([torch.cat([M, -M], 1), torch.cat([-M, M], 1)], 0)


def build_blob_sam(
    seed: int = 0,
    thresholds=(12.0, 200.0, 14.0, 8.0),
    amplitudes=(4.0, 40.0, 4.0, 4.0),
    content_weight: float = 3.0,
):
    """Tiny official Sam with hand-set weights whose masks are localised blobs
    around the prompt point, so that automatic mask generation yields many distinct,
    overlapping masks (random weights give near-identical whole-image masks).

    Mechanism (all in the release architecture): the image embedding is a 7-frequency
    subset of the prompt encoder's Fourier PE at each token (encoder blocks are
    identities, ``pos_embed`` carries it); the first token self-attention copies the
    point's PE into every token; the upscaling transposed convs rotate the features to
    the sub-token positions; the hypernetworks then give
    ``logit(y) = A_k * sum_i cos(theta_i(y) - theta_i(p)) - t_k`` with per-token
    amplitude ``A_k`` and threshold ``t_k``, plus ``content_weight`` times a patch-brightness term, so that the
    masks also depend on the image (crop) content. Features travel as [f, -f] pairs so LayerNorms only rescale and
    GELU(x) - GELU(-x) = x stays linear. IoU predictions come from a random head.
    """
    sam = build_official_tiny_sam(seed)
    g = torch.Generator().manual_seed(seed + 1)
    n, n2 = _N_FREQ, 2 * _N_FREQ  # 7 frequencies, 14 features f, 28 channels [f, -f]
    with torch.no_grad():
        pe = sam.prompt_encoder
        B = torch.zeros(2, 128)
        B[:, :n] = torch.randn(2, n, generator=g) * 1.2
        pe.pe_layer.positional_encoding_gaussian_matrix.copy_(B)
        for emb in [*pe.point_embeddings, pe.not_a_point_embed, pe.no_mask_embed]:
            emb.weight.zero_()
        pe_dims = torch.cat([torch.arange(n), 128 + torch.arange(n)])  # sin, cos of f

        # ---- image encoder: identity blocks, pos_embed = [f, -f] at token centres
        enc = sam.image_encoder
        # content channel pair [c, -c], c = patch mean of the normalised pixels / 2
        enc.patch_embed.proj.weight.zero_()
        enc.patch_embed.proj.bias.zero_()
        enc.patch_embed.proj.weight[2 * n2] = 0.5 / (3 * 16 * 16)
        enc.patch_embed.proj.weight[2 * n2 + 1] = -0.5 / (3 * 16 * 16)
        for blk in enc.blocks:
            for lin in (blk.attn.proj, blk.mlp.lin2):
                lin.weight.zero_()
                lin.bias.zero_()
        t = (torch.arange(16) + 0.5) / 16
        grid = torch.stack(torch.meshgrid(t, t, indexing="xy"), -1)  # (16, 16, 2) xy
        f = _pe_features(B, grid)  # (16, 16, 14)
        enc.pos_embed.zero_()
        enc.pos_embed[0, :, :, :n2] = f
        enc.pos_embed[0, :, :, n2 : 2 * n2] = -f
        eye = torch.eye(2 * n2 + 2)
        enc.neck[0].weight.zero_()
        enc.neck[0].weight[: 2 * n2 + 2, : 2 * n2 + 2, 0, 0] = eye
        enc.neck[2].weight.zero_()
        enc.neck[2].weight[: 2 * n2 + 2, : 2 * n2 + 2, 1, 1] = eye

        # ---- two-way transformer: layer-0 self-attention copies the point PE into
        # every token; every other residual branch is switched off
        dec = sam.mask_decoder
        dec.iou_token.weight.zero_()
        dec.mask_tokens.weight.zero_()
        tr = dec.transformer
        for layer in tr.layers:
            for att in (layer.self_attn, layer.cross_attn_token_to_image, layer.cross_attn_image_to_token):
                att.out_proj.weight.zero_()
                att.out_proj.bias.zero_()
            layer.mlp.lin2.weight.zero_()
            layer.mlp.lin2.bias.zero_()
        tr.final_attn_token_to_image.out_proj.weight.zero_()
        tr.final_attn_token_to_image.out_proj.bias.zero_()
        sa = tr.layers[0].self_attn  # 8 heads x 32
        for w in (sa.q_proj.weight, sa.q_proj.bias, sa.k_proj.weight, sa.k_proj.bias, sa.v_proj.weight, sa.v_proj.bias):
            w.zero_()
        heads = torch.arange(8) * 32
        sa.q_proj.bias[heads] = 1.0  # same query for every token
        sa.k_proj.weight[heads, _MARK] = 40.0 * np.sqrt(32)  # only real points score
        sa.v_proj.weight[torch.arange(n2), pe_dims] = 1.0  # v = f(p)
        sa.out_proj.weight[: 2 * n2, :n2] = torch.cat([torch.eye(n2), -torch.eye(n2)])  # -> [f, -f]

        # ---- upscaling: rotate to sub-pixel positions, keep [f, -f] pairs + constants
        up1, up2 = dec.output_upscaling[0], dec.output_upscaling[3]
        up1.weight.zero_()
        up1.bias.zero_()
        up2.weight.zero_()
        up2.bias.zero_()
        rho = float(np.sqrt(256 / n2))  # LayerNorm scale of a 28-channel [f, -f] vector
        up1.bias[2 * n2] = rho
        up1.bias[2 * n2 + 1] = -rho  # constant pair: LN2d(64) then scales f by 2
        for di in range(2):
            for dj in range(2):
                R1 = _rotation(B, (dj - 0.5) / 32, (di - 0.5) / 32)
                up1.weight[: 2 * n2, : 2 * n2, di, dj] = 0.5 * _pm(R1).T  # ConvT weight is (in, out)
                R2 = _rotation(B, (dj - 0.5) / 64, (di - 0.5) / 64)
                # GELU(2f) - GELU(-2f) = 2f, then rotate: out[j] = 0.5 * (R2 @ 2f)[j]
                up2.weight[:n2, :n2, di, dj] = 0.5 * R2.T
                up2.weight[n2 : 2 * n2, :n2, di, dj] = -0.5 * R2.T
        up2.weight[:, n2 : 2 * n2] = -up2.weight[:, :n2]  # second half = -f
        # content pair: emb 28/29 -> up1 30/31 -> up2 29/30
        up1.weight[2 * n2, 2 * n2 + 2] = 1.0
        up1.weight[2 * n2 + 1, 2 * n2 + 3] = 1.0
        up2.weight[2 * n2 + 2, 2 * n2 + 1] = 0.5
        up2.weight[2 * n2 + 3, 2 * n2 + 1] = -0.5
        up2.weight[2 * n2 + 2, 2 * n2 + 2] = -0.5
        up2.weight[2 * n2 + 3, 2 * n2 + 2] = 0.5
        up2.bias[2 * n2] = 2.0  # channel 28: constant GELU(2)
        # U(y) = [GELU(f(y)), GELU(-f(y)), GELU(2), GELU(c'), GELU(-c'), 0]

        # ---- hypernetworks: h = [A f(p), -A f(p), -t / GELU(2), w, -w]
        gelu2 = float(torch.nn.functional.gelu(torch.tensor(2.0)))
        for k, mlp in enumerate(dec.output_hypernetworks_mlps):
            l0, l1, l2 = mlp.layers
            for lin in (l0, l1, l2):
                lin.weight.zero_()
                lin.bias.zero_()
            l0.weight[: 2 * n2, : 2 * n2] = torch.eye(2 * n2)  # relu keeps f+ and f- parts
            l0.bias[2 * n2] = 1.0  # constant unit
            l1.weight[: 2 * n2 + 1, : 2 * n2 + 1] = torch.eye(2 * n2 + 1)
            s = amplitudes[k] / rho
            l2.weight[:n2, :n2] = s * torch.eye(n2)
            l2.weight[:n2, n2 : 2 * n2] = -s * torch.eye(n2)
            l2.weight[n2 : 2 * n2] = -l2.weight[:n2]
            l2.weight[2 * n2, 2 * n2] = -thresholds[k] / gelu2
            l2.weight[2 * n2 + 1, 2 * n2] = content_weight
            l2.weight[2 * n2 + 2, 2 * n2] = -content_weight

        # ---- IoU head: random function of the point PE, around 0.85
        last = dec.iou_prediction_head.layers[-1]
        last.weight.mul_(0.3)
        last.bias.fill_(0.85)
    return sam.eval()


def to_segany(official_sam, path):
    """Save ``official_sam``'s state_dict to ``path`` and load it with
    ``segany.build_sam("vit_tiny", checkpoint=path)``."""
    import segany

    torch.save(official_sam.state_dict(), path)
    return segany.build_sam("vit_tiny", checkpoint=str(path)).eval()
