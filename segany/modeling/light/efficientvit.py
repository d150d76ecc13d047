"""EfficientViT-SAM's image encoder (Zhang et al. 2024, "EfficientViT-SAM: Accelerated Segment Anything Model
Without Accuracy Loss"): timm's EfficientViT-L backbone plus the release's SamNeck and final LayerNorm.

Release read: github.com/mit-han-lab/efficientvit at de7d7733cc0329f391b33f1f459271562ec27bd5
(efficientvit/models/efficientvit/sam.py, backbone.py, efficientvit/models/nn/ops.py, sam_model_zoo.py).

Input size. The L models run the encoder at 512 px while the prompt encoder and the mask postprocessing keep
SAM's 1024 frame (the release's `image_size=(1024, 512)`): the neck resamples its inputs to stride 8 of the
encoder's input, so 512 px still gives the 64x64 embedding the mask decoder expects. Here that grid is
`img_size // 8` (the reduction of the finest fused stage), so forward((B, 3, img_size, img_size)) ->
(B, out_chans, img_size / 8, img_size / 8). As in the release the grid is fixed by `img_size`, not by the input:
another input size is resampled onto the same grid.

Backbone. timm's `EfficientVitLarge` has the release's L layout (stem with ResBlocks, fused-MBConv stages 1-2,
MBConv stage 3 and the LiteMLA stage 4 with their reduced norms, GELU-tanh everywhere) with the expand ratios
(16 / 24 downsampling, 4 / 6 in the blocks) fixed inside timm, so they are not keywords here. Built with
`norm_eps=1e-6` (the model zoo sets every norm's eps to 1e-6; timm's default is 1e-7), then two changes:
  * LiteMLA's eps: timm 1e-5, the release 1e-15 (`attn_eps`, set on timm's modules after building);
  * no classification head (timm's `prune_intermediate_layers` removes it; the SAM release has none).
The release switches LiteMLA to its quadratic form when a map has at most head_dim pixels (inputs of at most
160 px); that form computes the same function, so timm's linear form serves every size.
The XL models (xl0, xl1; 6 stages) are not this class: their stage 3 is fused-MBConv with full norms (timm:
MBConv with reduced norms), their stage 4 expands by 16 / 4 (timm: 24 / 6) and both attention stages aggregate
with 3x3 kernels (timm: 5x5), all hard-coded in timm's EfficientVitLarge; `release_args` rejects them.

Neck. timm has no SamNeck, so it is written here from timm's own blocks (ConvNormAct, FusedMBConv,
ResidualBlock): a 1x1 conv + BatchNorm per fused stage (last three, coarse to fine as in the release), bicubic
resampling to the grid, the sum, `neck_depth` residual fused-MBConvs, a 1x1 output conv with bias; then
LayerNorm2d. Differences from the release: the release resamples the finest map to its own size too (its
same-size shortcut compares a tuple to a list), an exact identity, skipped here; its upsampling runs in float32
under autocast, here in the input's dtype.
"""

import re
from functools import partial
from typing import Dict, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import GELUTanh, LayerNorm2d
from timm.models.efficientvit_mit import ConvNormAct, EfficientVitLarge, FusedMBConv, LiteMLA, ResidualBlock

# released L variants: the keywords that differ from the defaults (l0)
EFFICIENTVIT_SAM_L = {
    "l0": dict(depths=(1, 1, 1, 4, 4), neck_depth=4),
    "l1": dict(depths=(1, 1, 1, 6, 6), neck_depth=8),
    "l2": dict(depths=(1, 2, 2, 8, 8), neck_depth=12),
}

RELEASE_ANCHOR = "neck.output_ops.0.op_list.0.conv.weight"
RELEASE_UNUSED: Tuple[str, ...] = ()  # the released SAM checkpoints hold no weights the forward pass skips


class SamNeck(nn.Module):
    """Fuses the last three backbone stages on one grid: (B, C_i, H_i, W_i) x 3 -> (B, out_chans, grid, grid)."""

    def __init__(
        self,
        in_chans: Sequence[int] = (512, 256, 128),  # coarse to fine, as the release lists them
        grid: int = 64,
        width: int = 256,
        depth: int = 4,
        expand_ratio: float = 1.0,
        out_chans: int = 256,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.grid = grid
        norm = partial(nn.BatchNorm2d, eps=norm_eps)
        self.lateral = nn.ModuleList([ConvNormAct(c, width, 1, norm_layer=norm, act_layer=None) for c in in_chans])
        block = partial(
            FusedMBConv, width, width, expand_ratio=expand_ratio, norm_layer=norm, act_layer=(GELUTanh, None)
        )
        self.blocks = nn.Sequential(*[ResidualBlock(block(), nn.Identity()) for _ in range(depth)])
        self.proj = nn.Conv2d(width, out_chans, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        x = None
        for f, lateral in reversed(list(zip(feats, self.lateral))):  # finest first: the release's summation order
            f = lateral(f)
            if f.shape[-2:] != (self.grid, self.grid):
                f = F.interpolate(f, size=(self.grid, self.grid), mode="bicubic", align_corners=False)
            x = f if x is None else f + x
        return self.proj(self.blocks(x))


class EfficientViTEncoder(nn.Module):
    """EfficientViT-SAM-L image encoder: (B, 3, img_size, img_size) -> (B, out_chans, img_size/8, img_size/8).
    Defaults are the released L0; `EFFICIENTVIT_SAM_L` lists L1 / L2."""

    def __init__(
        self,
        img_size: int = 512,
        out_chans: int = 256,
        in_chans: int = 3,
        widths: Sequence[int] = (32, 64, 128, 256, 512),  # stem, stages 1-4 (strides 2, 4, 8, 16, 32)
        depths: Sequence[int] = (1, 1, 1, 4, 4),
        head_dim: int = 32,  # LiteMLA's per-head q/k/v width
        attn_eps: float = 1e-15,
        norm_eps: float = 1e-6,
        neck_width: int = 256,
        neck_depth: int = 4,
        neck_expand_ratio: float = 1.0,
    ):
        super().__init__()
        self.img_size = img_size
        self.out_chans = out_chans
        # a head is required by the constructor (head_widths) and pruned below; tiny widths keep it cheap
        self.backbone = EfficientVitLarge(
            in_chans, tuple(widths), tuple(depths), head_dim, num_classes=0, head_widths=(1, 1), norm_eps=norm_eps
        )
        n = len(self.backbone.stages)
        self.fused = (n - 3, n - 2, n - 1)  # timm stage indices of the last three stages (strides 8, 16, 32)
        self.backbone.prune_intermediate_layers(list(self.fused), prune_head=True)
        for m in self.backbone.modules():
            if isinstance(m, LiteMLA):
                m.eps = attn_eps
        grid = img_size // self.backbone.feature_info[self.fused[0]]["reduction"]
        in_ch = [self.backbone.feature_info[i]["num_chs"] for i in reversed(self.fused)]
        self.neck = SamNeck(in_ch, grid, neck_width, neck_depth, neck_expand_ratio, out_chans, norm_eps)
        self.norm = LayerNorm2d(out_chans, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone.forward_intermediates(x, indices=list(self.fused), intermediates_only=True)
        return self.norm(self.neck(feats[::-1]))  # coarse to fine


def _sub(rules, key: str) -> str:
    for pattern, fn in rules:
        m = re.fullmatch(pattern, key)
        if m:
            return fn(*m.groups())
    raise ValueError(f"EfficientViT-SAM: unexpected key {key!r}")


# release -> segany: stage 0 (conv + ResBlocks) is timm's stem, release stage s >= 1 is timm's stages[s-1]
_FROM = [
    (r"backbone\.stages\.0\.op_list\.0\.(.+)", lambda r: f"backbone.stem.in_conv.{r}"),
    (r"backbone\.stages\.0\.op_list\.(\d+)\.(.+)", lambda j, r: f"backbone.stem.res{int(j) - 1}.{r}"),
    (r"backbone\.stages\.(\d+)\.op_list\.(.+)", lambda s, r: f"backbone.stages.{int(s) - 1}.blocks.{r}"),
    (r"neck\.input_ops\.(\d+)\.op_list\.0\.(.+)", lambda k, r: f"neck.lateral.{k}.{r}"),
    (r"neck\.middle\.op_list\.(.+)", lambda r: f"neck.blocks.{r}"),
    (r"neck\.output_ops\.0\.op_list\.0\.conv\.(.+)", lambda r: f"neck.proj.{r}"),
    (r"(norm\..+)", lambda r: r),
]
_TO = [
    (r"backbone\.stem\.in_conv\.(.+)", lambda r: f"backbone.stages.0.op_list.0.{r}"),
    (r"backbone\.stem\.res(\d+)\.(.+)", lambda j, r: f"backbone.stages.0.op_list.{int(j) + 1}.{r}"),
    (r"backbone\.stages\.(\d+)\.blocks\.(.+)", lambda s, r: f"backbone.stages.{int(s) + 1}.op_list.{r}"),
    (r"neck\.lateral\.(\d+)\.(.+)", lambda k, r: f"neck.input_ops.{k}.op_list.0.{r}"),
    (r"neck\.blocks\.(.+)", lambda r: f"neck.middle.op_list.{r}"),
    (r"neck\.proj\.(.+)", lambda r: f"neck.output_ops.0.op_list.0.conv.{r}"),
    (r"(norm\..+)", lambda r: r),
]


def from_release(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Released image-encoder weights ("image_encoder." stripped) -> EfficientViTEncoder's state_dict.
    Only names change (values, shapes and BatchNorm buffers are the same tensors)."""
    return {_sub(_FROM, k): v for k, v in sd.items()}


def to_release(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """EfficientViTEncoder's state_dict -> the released layout (the inverse of `from_release`)."""
    return {_sub(_TO, k): v for k, v in sd.items()}


def release_args(sd: Dict[str, torch.Tensor]) -> dict:
    """Constructor keywords (all but img_size / out_chans) read from a released state dict's shapes."""

    def get(key):
        if key not in sd:
            raise ValueError(f"EfficientViT-SAM: missing key {key!r}")
        return sd[key]

    def count(prefix):
        pat = re.compile(re.escape(prefix) + r"(\d+)\.")
        return len({m.group(1) for m in map(pat.match, sd) if m})

    n_stages, stage3 = count("backbone.stages."), "backbone.stages.3.op_list.0.main.inverted_conv.conv.weight"
    if n_stages != 5 or stage3 not in sd:
        raise ValueError(
            f"EfficientViT-SAM: {n_stages} backbone stages{'' if stage3 in sd else ', no ' + repr(stage3)}: "
            "not the L layout (the XL models are not supported: timm's EfficientVitLarge cannot build them)"
        )
    stem = get("backbone.stages.0.op_list.0.conv.weight")  # (w0, in_chans, 3, 3)
    widths = [stem.shape[0]] + [
        get(f"backbone.stages.{s}.op_list.0.main.point_conv.conv.weight").shape[0] for s in (1, 2, 3, 4)
    ]
    depths = [count(f"backbone.stages.{s}.op_list.") - 1 for s in range(5)]
    head_dim = get("backbone.stages.4.op_list.1.context_module.main.aggreg.0.1.weight").shape[1]  # groups of head_dim
    lateral = [get(f"neck.input_ops.{k}.op_list.0.conv.weight") for k in range(count("neck.input_ops."))]
    if [w.shape[1] for w in lateral] != [widths[4], widths[3], widths[2]]:
        raise ValueError("EfficientViT-SAM: neck.input_ops.*.op_list.0.conv.weight do not read stages 4, 3, 2")
    neck_width = lateral[0].shape[0]
    mid = get("neck.middle.op_list.0.main.spatial_conv.conv.weight").shape[0]
    return dict(
        in_chans=stem.shape[1],
        widths=tuple(widths),
        depths=tuple(depths),
        head_dim=head_dim,
        neck_width=neck_width,
        neck_depth=count("neck.middle.op_list."),
        neck_expand_ratio=mid / neck_width,
    )
