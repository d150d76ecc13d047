"""The architecture of a SAM state dict that stores none (a released .pth with no `<name>.json`
beside it), read from its tensor shapes, so that any size loads without model overrides.

What the shapes give (segany key names; S = img_size, p = patch size, g = S / p):
  patch_embed.proj.weight (C, 3, p, p)        embed_dim C, patch_size p
  pos_embed (1, g, g, C)                      img_size = g * p
  blocks.<i>.attn.qkv.weight                  depth = number of blocks
  blocks.<i>.attn.rel_pos_h (2 s - 1, C / h)  head width -> num_heads h; s = g: a global block
                                              (global_attn_indexes), else s = window_size
  neck.0.weight (D, C, 1, 1)                  prompt_embed_dim D
  prompt_encoder.mask_downscaling.3.weight    mask_in_chans
  mask_decoder.transformer.layers.<j>         decoder_depth; mlp.lin1.weight -> decoder_mlp_dim
  mask_decoder.mask_tokens.weight (m + 1, D)  num_multimask_outputs m
  mask_decoder.iou_prediction_head.layers.<k> iou_head_depth, iou_head_hidden_dim
  prompt_encoder.text_proj.0.weight (D, E)    text_embed_dim E (segany's text prompt; absent: 0)
  mask_decoder.hf_token / hf_mlp / compress_vit_feat / embedding_encoder / embedding_maskfeature
                                              hq_token (HQ-SAM; any of them present: True)
  mask_decoder.compress_vit_feat.0.weight (C, H, 2, 2)   hq_compress_dim H (None when D, the release)
  mask_decoder.embedding_encoder.0.weight (D, H', 2, 2)  hq_hidden_dim H' (None when D / 4, the release)
  (which block HQ-SAM fuses is in no shape: the release's, the first global-attention block)

One number is not in any shape: the decoder's head count (its attention projections are
D x D whatever the split). It is taken as D / 32, the release's head width (256 / 8), which
is what every released size and the demo model use. A checkpoint whose decoder has another
head count must carry its architecture (train.py .ckpt, or export's `<name>.json`).
"""

from __future__ import annotations

import re
from typing import Dict, Optional

import torch

from segany.modeling.hq import HQ_KEYS
from segany.modeling.variants import VARIANTS

DECODER_HEAD_WIDTH = 32  # the release: 256-wide decoder, 8 heads

_ENC = "image_encoder."


def _count(state_dict: Dict[str, torch.Tensor], pattern: str) -> int:
    found = {int(m.group(1)) for k in state_dict if (m := re.fullmatch(pattern, k))}
    return max(found) + 1 if found else 0


def _hq_architecture(sd: Dict[str, torch.Tensor], prompt_dim: int) -> dict:
    """HQ-SAM's fields: hq_token when any HQ key is there; its widths where their first tensor is
    (a file missing one is built by the release's widths, and its strict load names the key)."""
    if not any(k.startswith(HQ_KEYS) for k in sd):
        return {"hq_token": False}
    compress = sd.get("mask_decoder.compress_vit_feat.0.weight")
    hidden = sd.get("mask_decoder.embedding_encoder.0.weight")
    compress = None if compress is None or compress.shape[1] == prompt_dim else int(compress.shape[1])
    hidden = None if hidden is None or hidden.shape[1] == prompt_dim // 4 else int(hidden.shape[1])
    return {"hq_token": True, "hq_compress_dim": compress, "hq_hidden_dim": hidden}


def infer_architecture(sd: Dict[str, torch.Tensor]) -> Optional[dict]:
    """segany-named SAM weights -> the build_sam keywords of their architecture (every
    architectural field of SamConfig, plus `variant` when the encoder is a released size at
    its native input size); None when the dict is not a whole SAM (the caller's model config
    decides then, and the strict load names what does not fit)."""
    try:
        proj = sd[_ENC + "patch_embed.proj.weight"]
        embed_dim, patch = int(proj.shape[0]), int(proj.shape[-1])
        grid = int(sd[_ENC + "pos_embed"].shape[1])
        depth = _count(sd, r"image_encoder\.blocks\.(\d+)\.attn\.qkv\.weight")
        sizes = [(int(sd[f"{_ENC}blocks.{i}.attn.rel_pos_h"].shape[0]) + 1) // 2 for i in range(depth)]
        head_dim = int(sd[_ENC + "blocks.0.attn.rel_pos_h"].shape[1])
        prompt_dim = int(sd[_ENC + "neck.0.weight"].shape[0])
        arch = {
            "embed_dim": embed_dim,
            "depth": depth,
            "num_heads": embed_dim // head_dim,
            "global_attn_indexes": [i for i, s in enumerate(sizes) if s == grid],
            "img_size": grid * patch,
            "patch_size": patch,
            # all global (a window as large as the grid is the same attention): the release's 14
            "window_size": next((s for s in sizes if s != grid), 14),
            "prompt_embed_dim": prompt_dim,
            "mask_in_chans": int(sd["prompt_encoder.mask_downscaling.3.weight"].shape[0]),
            "decoder_depth": _count(sd, r"mask_decoder\.transformer\.layers\.(\d+)\.self_attn\.q_proj\.weight"),
            "decoder_heads": max(1, prompt_dim // DECODER_HEAD_WIDTH),
            "decoder_mlp_dim": int(sd["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0]),
            "num_multimask_outputs": int(sd["mask_decoder.mask_tokens.weight"].shape[0]) - 1,
            "iou_head_depth": _count(sd, r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\.weight"),
            "iou_head_hidden_dim": int(sd["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0]),
            "text_embed_dim": int(sd["prompt_encoder.text_proj.0.weight"].shape[1])
            if "prompt_encoder.text_proj.0.weight" in sd
            else 0,
        }
        arch.update(_hq_architecture(sd, prompt_dim))
    except (KeyError, IndexError):
        return None
    if depth == 0 or head_dim == 0 or embed_dim % head_dim:
        return None
    for name, v in VARIANTS.items():
        if (v.embed_dim, v.depth, v.num_heads, list(v.global_attn_indexes), v.img_size) == (
            embed_dim,
            depth,
            arch["num_heads"],
            arch["global_attn_indexes"],
            arch["img_size"],
        ):
            return {"variant": name, **arch}
    return {"variant": None, **arch}
