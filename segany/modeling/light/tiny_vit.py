"""MobileSAM's image encoder: timm's TinyViT-5M with the last downsampling at stride 1, plus SAM's neck.

Paper: Zhang et al. 2023, "Faster Segment Anything: Towards Lightweight SAM for Mobile Applications"
(decoupled distillation of SAM ViT-H's image encoder into TinyViT-5M). Release read:
github.com/ChaoningZhang/MobileSAM at commit 34bbbfdface3c18e5221aa7de6032d7220c6c6a1,
`mobile_sam/modeling/tiny_vit_sam.py` (model) and `mobile_sam/build_sam.py` (`build_sam_vit_t`: the
defaults below). The backbone is `timm.models.tiny_vit.TinyVit`, built with explicit numbers; this module
keeps its `patch_embed` and `stages` (so keys are timm's) and drops its classification head.

What MobileSAM changed in TinyViT, reproduced here on timm's modules:
  * the last PatchMerging's depthwise 3x3 conv has stride 1 (the release sets stride 1 whenever
    `out_dim` is 320, 448 or 576, the last width of every TinyViT size), so the stride is 4, 8, 16, 16:
    a (B, 3, S, S) image gives a (B, 320, S/16, S/16) map. Here the keyword `downsample_strides` (one per
    PatchMerging) is written into timm's `stages[i].downsample.conv2.conv` after building;
  * a neck as in SAM's ViT encoder: Conv 1x1 (no bias), LayerNorm2d, Conv 3x3 (no bias), LayerNorm2d, to
    `out_chans`. timm's TinyVit has no such neck, so it is written here (`timm.layers.LayerNorm2d`,
    eps 1e-6: the same function and `weight` / `bias` keys as the release's hand-written LayerNorm2d).

Released layout -> this module (`from_release` / `to_release`):
  * the release downsamples at the END of `layers[i]` (i = 0..2), timm at the START of `stages[i + 1]`:
    `layers.{i}.downsample.*` is `stages.{i+1}.downsample.*`, `layers.{i}.blocks.*` is `stages.{i}.blocks.*`
    (same computation in the same order);
  * the release's Conv2d_BN names its conv `.c`, timm's ConvNorm `.conv` (`.bn` in both); the release's
    `patch_embed.seq.0` / `seq.2` are timm's `patch_embed.conv1` / `conv2`;
  * attention-bias tables: both build the (window^2, window^2) index from the insertion order of a dict of
    (|dy|, |dx|) offsets (timm 1.0's `Attention._init_buffers` is the original's loop), so the
    (heads, window^2) tables are copied unchanged; the tests check the two index buffers are equal;
  * the release keeps TinyViT's ImageNet head (`norm_head`, `head`, 1000 classes), never used by its
    forward: dropped (`RELEASE_UNUSED`), written back as LayerNorm ones/zeros and Linear zeros.
Numerics are the release's: exact (erf) GELU, LayerNorm eps 1e-5 in attention and MLP, BatchNorm eps 1e-5.
One difference: the release's forward reshapes tokens to a fixed 64x64 (1024 px only); timm's stages
keep (B, C, H, W), so this encoder runs at any S divisible by 16 (window attention pads as the release's).

timm's `tiny_vit_5m_224` has the same embed_dims / depths / num_heads / window_sizes; it differs in the last
stride (2: an S/32 map), its classification head and 224 px. Its ImageNet weights have this module's
`patch_embed.*` / `stages.*` keys and shapes (the stride has no parameters), so they could initialise the
backbone (strict=False: no neck); MobileSAM's released encoder is instead distilled from SAM ViT-H.
"""

import math
import re
from typing import Dict, Sequence

import torch
import torch.nn as nn
from timm.layers import LayerNorm2d
from timm.models.tiny_vit import TinyVit

RELEASE_ANCHOR = "patch_embed.seq.0.c.weight"
RELEASE_UNUSED = ("norm_head.weight", "norm_head.bias", "head.weight", "head.bias")
RELEASE_NUM_CLASSES = 1000  # the released head's classes (TinyViT's ImageNet-1k head)
_RELEASE_STRIDE1_DIMS = (320, 448, 576)  # the release's PatchMerging takes stride 1 to these widths


class TinyViTEncoder(nn.Module):
    """(B, in_chans, S, S) normalised image -> (B, out_chans, S/16, S/16) embedding (S = 1024: 64x64)."""

    def __init__(
        self,
        img_size: int = 1024,
        out_chans: int = 256,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),  # the first is unused (stage 0 is convolutional)
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        downsample_strides: Sequence[int] = (2, 2, 1),  # PatchMerging into stages 1, 2, 3
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if len(downsample_strides) != len(embed_dims) - 1:
            raise ValueError(f"downsample_strides needs {len(embed_dims) - 1} entries, got {downsample_strides}")
        self.img_size = img_size
        self.out_chans = out_chans
        trunk = TinyVit(
            in_chans=in_chans,
            num_classes=0,
            embed_dims=tuple(embed_dims),
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            window_sizes=tuple(window_sizes),
            mlp_ratio=mlp_ratio,
            drop_path_rate=drop_path_rate,
            mbconv_expand_ratio=mbconv_expand_ratio,
            local_conv_size=local_conv_size,
        )
        self.patch_embed = trunk.patch_embed  # (B, 3, S, S) -> (B, C0, S/4, S/4)
        self.stages = trunk.stages  # stage i > 0 starts with its PatchMerging
        for stage, stride in zip(list(self.stages)[1:], downsample_strides):
            stage.downsample.conv2.conv.stride = (stride, stride)  # MobileSAM: (2, 2, 1)
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, C0, S/4, S/4)
        x = self.stages(x)  # (B, C3, S/16, S/16)
        return self.neck(x)  # (B, out_chans, S/16, S/16)


def _from_release_key(k: str) -> str:
    m = re.fullmatch(r"layers\.(\d+)\.downsample\.(.*)", k)
    k = f"stages.{int(m[1]) + 1}.downsample.{m[2]}" if m else re.sub(r"^layers\.", "stages.", k)
    k = re.sub(r"^patch_embed\.seq\.0\.", "patch_embed.conv1.", k)
    k = re.sub(r"^patch_embed\.seq\.2\.", "patch_embed.conv2.", k)
    return re.sub(r"\.c\.weight$", ".conv.weight", k)


def _to_release_key(k: str) -> str:
    m = re.fullmatch(r"stages\.(\d+)\.downsample\.(.*)", k)
    k = f"layers.{int(m[1]) - 1}.downsample.{m[2]}" if m else re.sub(r"^stages\.", "layers.", k)
    k = re.sub(r"^patch_embed\.conv1\.", "patch_embed.seq.0.", k)
    k = re.sub(r"^patch_embed\.conv2\.", "patch_embed.seq.2.", k)
    return re.sub(r"\.conv\.weight$", ".c.weight", k)


def from_release(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Released image-encoder weights (prefix stripped) -> this module's state_dict; drops RELEASE_UNUSED."""
    out = {}
    for k, v in sd.items():
        if k in RELEASE_UNUSED:
            continue
        if not k.startswith(("patch_embed.", "layers.", "neck.")):
            raise ValueError(f"unexpected key in a MobileSAM image encoder: {k}")
        out[_from_release_key(k)] = v
    return out


def to_release(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """This module's state_dict -> the release's layout, with the unused head as neutral values."""
    out = {_to_release_key(k): v for k, v in sd.items()}
    dim = sd["neck.0.weight"].shape[1]
    like = dict(dtype=sd["neck.0.weight"].dtype, device=sd["neck.0.weight"].device)
    out["norm_head.weight"] = torch.ones(dim, **like)
    out["norm_head.bias"] = torch.zeros(dim, **like)
    out["head.weight"] = torch.zeros(RELEASE_NUM_CLASSES, dim, **like)
    out["head.bias"] = torch.zeros(RELEASE_NUM_CLASSES, **like)
    return out


def release_args(sd: Dict[str, torch.Tensor]) -> dict:
    """Constructor keywords (all but img_size / out_chans) from a released state dict's shapes."""

    def get(key: str) -> torch.Tensor:
        if key not in sd:
            raise ValueError(f"MobileSAM image encoder: missing {key}")
        return sd[key]

    num_stages = 1 + max((int(m[1]) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))), default=-1)
    if num_stages < 2:
        raise ValueError("MobileSAM image encoder: missing layers.1.*")
    blocks = {m.groups() for k in sd if (m := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", k))}  # {(stage, block)}
    depths = [sum(int(s) == i for s, _ in blocks) for i in range(num_stages)]
    embed_dims = [get("layers.0.blocks.0.conv1.c.weight").shape[1]]
    embed_dims += [get(f"layers.{i}.downsample.conv1.c.weight").shape[0] for i in range(num_stages - 1)]
    num_heads, window_sizes = [2], [7]  # stage 0 is convolutional: unused, not in the file (the release's values)
    for i in range(1, num_stages):
        heads, offsets = get(f"layers.{i}.blocks.0.attn.attention_biases").shape
        num_heads.append(heads)
        window_sizes.append(math.isqrt(offsets))
    return dict(
        in_chans=get("patch_embed.seq.0.c.weight").shape[1],
        embed_dims=tuple(embed_dims),
        depths=tuple(depths),
        num_heads=tuple(num_heads),
        window_sizes=tuple(window_sizes),
        mlp_ratio=get("layers.1.blocks.0.mlp.fc1.weight").shape[0] / embed_dims[1],
        mbconv_expand_ratio=get("layers.0.blocks.0.conv1.c.weight").shape[0] / embed_dims[0],
        local_conv_size=get("layers.1.blocks.0.local_conv.c.weight").shape[-1],
        downsample_strides=tuple(1 if d in _RELEASE_STRIDE1_DIMS else 2 for d in embed_dims[1:]),
    )
