"""MAE-pretrained (or timm) ViT weights -> SAM's image encoder (`build_sam(encoder_init=...)`,
the paper's initialisation): timm key names, the position embedding resized to the encoder's
grid; the relative-position tables and the neck stay at their fresh init."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed, resample_abs_pos_embed_nhwc

from segany.modeling.checkpoint.read import read_tensors
from segany.modeling.checkpoint.trust import CheckpointError


@dataclass
class InitReport:
    loaded: List[str]
    unused: List[str]  # in the checkpoint, not used by the encoder
    not_initialised: List[str]  # in the encoder, left at their fresh init (rel-pos, neck)

    def __str__(self) -> str:
        return f"{len(self.loaded)} tensors loaded; unused: {self.unused}; left at init: {self.not_initialised}"


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, [1 +] g*g, C) or (1, g, g, C) -> (1, grid, grid, C), dropping a class token, bicubic
    (timm's ``resample_abs_pos_embed[_nhwc]``, without antialiasing: plain bicubic upsampling).
    Only the class-token detection is ours: timm needs the number of prefix tokens given."""
    if pos_embed.dim() == 4:
        return resample_abs_pos_embed_nhwc(pos_embed, [grid, grid], antialias=False)
    n = pos_embed.shape[1]
    if math.isqrt(n - 1) ** 2 == n - 1:  # MAE / timm ViT: a class token first
        pos_embed = pos_embed[:, 1:]
    elif math.isqrt(n) ** 2 != n:
        raise CheckpointError(f"pos_embed with {n} tokens is not a square grid")
    resized = resample_abs_pos_embed(pos_embed, [grid, grid], num_prefix_tokens=0, antialias=False)
    return resized.reshape(1, grid, grid, -1)  # (1, grid*grid, C) -> (1, grid, grid, C)


def load_mae_encoder(encoder: nn.Module, path: str) -> InitReport:
    """Load an MAE-pretrained ViT (MAE or timm key names) into the image encoder."""
    given = {k.removeprefix("encoder."): v for k, v in read_tensors(path).items()}
    expected = encoder.state_dict()
    grid = expected["pos_embed"].shape[1]
    if "pos_embed" in given:
        given["pos_embed"] = resize_pos_embed(given["pos_embed"], grid)
    usable = {k: v for k, v in given.items() if k in expected}
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs encoder {tuple(expected[k].shape)}"
        for k, v in usable.items()
        if v.shape != expected[k].shape
    ]
    if wrong:
        raise CheckpointError(f"MAE checkpoint {path!r} does not fit this encoder size:\n    " + "\n    ".join(wrong))
    if not any(k.startswith("blocks.") for k in usable):
        raise CheckpointError(f"{path!r} holds no ViT blocks with timm/MAE key names (blocks.N.attn.qkv ...)")
    encoder.load_state_dict(usable, strict=False)
    return InitReport(
        loaded=sorted(usable),
        unused=sorted(set(given) - set(usable)),
        not_initialised=sorted(set(expected) - set(usable)),
    )
