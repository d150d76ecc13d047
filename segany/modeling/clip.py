"""CLIP for the text prompt (SAM paper §7.5, appendix D.5): an OpenCLIP model from a local file.

SAM is trained with the CLIP *image* embedding of a crop around each mask as its first prompt
and queried with the CLIP *text* embedding at inference; both come from one `ClipEncoder`.

    clip = build_clip("ViT-L-14-336", checkpoint="/models/open_clip_model.safetensors")
    clip.encode_text(["a photo of a wheel."])       # (1, 768), L2-normalised
    clip.encode_images(crops)                        # list of (h, w, 3) uint8 RGB -> (n, 768)

The architecture is an OpenCLIP model name (`open_clip.list_models()`, built without weights:
nothing is downloaded) or a config dict in OpenCLIP's format ({embed_dim, vision_cfg, text_cfg},
e.g. a tiny one for tests). The weights come from `checkpoint`, a local OpenCLIP / OpenAI
state dict (.bin / .pt / .pth / .safetensors), read with `open_clip.load_checkpoint` as data
(`weights_only=True`; an OpenAI TorchScript archive is code and is refused: use the
safetensors of the same weights, e.g. the hub's `timm/vit_large_patch14_clip_336.openai`).
Without a checkpoint the model stays randomly initialised (the CPU demo, tests).
`open_clip_torch` is an optional dependency (pip install segany[text]), imported when used.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from segany.modeling.checkpoint import CheckpointError


def _open_clip():
    try:
        import open_clip
    except ImportError as e:  # pragma: no cover - the dependency is installed with [text]
        raise ImportError("the text prompt needs OpenCLIP: pip install open_clip_torch (segany[text])") from e
    return open_clip


class ClipEncoder(nn.Module):
    """An OpenCLIP model with its tokenizer and image normalisation; frozen, eval mode.

    encode_images: RGB crops (any size) -> (n, D) L2-normalised image embeddings; each crop is
    resized to the model's square input (bilinear, antialiased) and normalised with its mean/std.
    encode_text: strings -> (n, D) L2-normalised text embeddings."""

    def __init__(self, model: nn.Module, tokenizer, name: str):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        size = model.visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        mean = getattr(model.visual, "image_mean", None) or _open_clip().OPENAI_DATASET_MEAN
        std = getattr(model.visual, "image_std", None) or _open_clip().OPENAI_DATASET_STD
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float).view(1, 3, 1, 1) * 255, False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float).view(1, 3, 1, 1) * 255, False)

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[-1] if self.model.text_projection is not None else 0) or int(
            self.model.visual.output_dim
        )

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def preprocess(self, crops: Sequence[Union[np.ndarray, torch.Tensor]]) -> torch.Tensor:
        """[(h, w, 3) uint8 RGB] -> (n, 3, H, W) normalised model input."""
        out = []
        for c in crops:
            x = torch.as_tensor(np.ascontiguousarray(c) if isinstance(c, np.ndarray) else c, device=self.device)
            x = x.permute(2, 0, 1)[None].float()  # (1, 3, h, w)
            out.append(F.interpolate(x, self.image_size, mode="bilinear", align_corners=False, antialias=True))
        return (torch.cat(out) - self.mean) / self.std

    @torch.no_grad()
    def encode_images(self, crops: Sequence[Union[np.ndarray, torch.Tensor]]) -> torch.Tensor:
        if len(crops) == 0:
            return torch.zeros(0, self.embed_dim, device=self.device)
        return self.model.encode_image(self.preprocess(crops), normalize=True).float()

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)
        return self.model.encode_text(tokens, normalize=True).float()


def build_clip(
    model_name: Optional[str] = None,
    checkpoint: Optional[str] = None,
    config: Optional[dict] = None,
) -> ClipEncoder:
    """An OpenCLIP model by name (e.g. "ViT-L-14-336", the paper's) or from an OpenCLIP config
    dict (`config`: {embed_dim, vision_cfg, text_cfg}), with the weights of the local file
    `checkpoint` (None: random init). Never downloads."""
    open_clip = _open_clip()
    if (model_name is None) == (config is None):
        raise ValueError("build_clip: give model_name (an OpenCLIP model name) or config (a config dict), not both")
    if config is not None:
        cfg = dict(config)
        model = open_clip.CLIP(**cfg)
        text_cfg = cfg.get("text_cfg", {})
        ctx = text_cfg.get("context_length", 77) if isinstance(text_cfg, dict) else text_cfg.context_length
        tokenizer = open_clip.SimpleTokenizer(context_length=ctx)
        name = "custom"
    else:
        if model_name not in open_clip.list_models():
            raise ValueError(f"build_clip: unknown OpenCLIP model {model_name!r} (open_clip.list_models())")
        model = open_clip.create_model(model_name, pretrained=None)
        tokenizer = open_clip.get_tokenizer(model_name)
        name = model_name
    if checkpoint is not None:
        if not os.path.isfile(checkpoint):
            raise CheckpointError(f"CLIP checkpoint {checkpoint!r} does not exist")
        try:
            open_clip.load_checkpoint(model, checkpoint, strict=True, weights_only=True)
        except Exception as e:
            raise CheckpointError(
                f"cannot load CLIP checkpoint {checkpoint!r} into OpenCLIP {name!r} "
                f"(weights_only: a TorchScript or pickled-object file is refused): {e}"
            ) from e
    return ClipEncoder(model, tokenizer, name)
