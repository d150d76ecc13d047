"""EdgeSAM's image encoder: timm's RepViT-M1 plus EdgeSAM's two-stage fusion neck.

Paper: Zhou et al. 2023, "EdgeSAM: Prompt-In-the-Loop Distillation for On-Device Deployment of SAM" (RepViT-M1
distilled from SAM ViT-H's encoder, then fine-tuned with the mask decoder in the loop). Release read:
github.com/chongzhou96/EdgeSAM at commit b53372c0f5fb25bc1fb76eb583f77348b00854b2, `edge_sam/modeling/rep_vit.py`
(model), `edge_sam/modeling/common.py` (neck ops), `edge_sam/build_sam.py` (`build_edge_sam`: RepViT "m1",
`fuse=True`, bicubic upsampling: the defaults below) and `training/configs/rep_vit_m1_fuse_sa_distill.yaml`.

Backbone. `timm.models.repvit.RepVit` built with explicit numbers and `legacy=True` (the original RepViT's
blocks, as in EdgeSAM: the 1x1 depthwise branch of RepVGGDW has its own BatchNorm and no BatchNorm follows the
sum). Its stages are EdgeSAM's m1 table: EdgeSAM's 26 blocks are timm's 2 + (1 + 1 + 2) + (1 + 1 + 14) +
(1 + 1 + 2), where each later timm stage opens with a `RepVitDownsample` that holds the previous width's last
block (`pre_block`, no squeeze-excite), the stride-2 depthwise conv and 1x1 projection, and a residual MLP;
squeeze-excite alternates from the first block of each stage in both. Exact (erf) GELU, BatchNorm eps 1e-5.
The released checkpoint is in training form (Conv2d_BN as `.c` / `.bn`, the RepVGG branches unmerged;
`build_edge_sam` never calls `fuse()`), which is the layout of timm's ConvNorm too (`.c` / `.bn`).

What EdgeSAM changed, reproduced here on timm's modules:
  * no classification head (timm's is dropped; the release builds none);
  * the features it fuses: the last block at width 192 (stride 16) and the end of the network (384, stride 32).
    The first is, in timm's layout, the output of `stages[3].downsample.pre_block`, inside timm's last stage,
    so `forward` runs that stage's parts one by one (the order of timm's `RepVitDownsample.forward`, timm 1.0);
  * the neck (timm has none, so it is written here): 1x1 conv (no bias) on each, the stride-32 map upsampled x2
    (bicubic, align_corners=False, as in the release), summed; then SAM's neck, Conv 1x1 / LayerNorm2d /
    Conv 3x3 / LayerNorm2d (eps 1e-6; LayerNorm, not BatchNorm, as in the release; no conv biases).
No stride is changed in the released model. (The release's `fuse=False` variant, not released, removes the
last downsampling instead of fusing; not built here.) The release exports ONNX / CoreML with
`upsample_mode="bilinear"` (CoreML lacks bicubic); its PyTorch model and checkpoint use bicubic.

The output is (B, out_chans, S/16, S/16) for S a multiple of 32 (the stride-32 map is upsampled x2 onto the
stride-16 one), 64x64 at 1024 px.

Released layout -> this module (`from_release` / `to_release`): `features.0.{0,2}` -> `stem.conv{1,2}`;
`features.<i>` (i >= 1) in order -> timm's blocks as above, with `token_mixer.0.conv{,1}` ->
`token_mixer.conv{,1}`, `token_mixer.1` -> `se`, `channel_mixer.m.{0,2}` -> `channel_mixer.conv{1,2}` in
stride-1 blocks and `token_mixer.{0,2}` -> `{spatial,channel}_downsample`, `channel_mixer.m.{0,2}` ->
`ffn.conv{1,2}` in stride-2 blocks; `fuse_stage3.op_list.0` -> `fuse_stage3`; `fuse_stage2.*` and `neck.*`
unchanged. The release holds no image-encoder weights the forward pass skips (`RELEASE_UNUSED` is empty).
"""

import re
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from timm.models.repvit import RepVit

RELEASE_ANCHOR = "fuse_stage3.op_list.0.weight"
RELEASE_UNUSED: Tuple[str, ...] = ()  # EdgeSAM's RepViT has no head: every released weight is used

_STRIDE1 = (  # release suffix -> timm suffix inside a stride-1 block (timm RepViTBlock)
    ("token_mixer.0.conv.", "token_mixer.conv."),
    ("token_mixer.0.conv1.", "token_mixer.conv1."),
    ("token_mixer.1.", "se."),
    ("channel_mixer.m.0.", "channel_mixer.conv1."),
    ("channel_mixer.m.2.", "channel_mixer.conv2."),
)
_STRIDE2 = (  # ... inside a stride-2 block (timm RepVitDownsample, less its pre_block)
    ("token_mixer.0.", "spatial_downsample."),
    ("token_mixer.2.", "channel_downsample."),
    ("channel_mixer.m.0.", "ffn.conv1."),
    ("channel_mixer.m.2.", "ffn.conv2."),
)
_TOP = (("features.0.0.", "stem.conv1."), ("features.0.2.", "stem.conv2."), ("fuse_stage3.op_list.0.", "fuse_stage3."))


class RepViTEncoder(nn.Module):
    """(B, in_chans, S, S) normalised image -> (B, out_chans, S/16, S/16) embedding (S = 1024: 64x64)."""

    def __init__(
        self,
        img_size: int = 1024,
        out_chans: int = 256,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (48, 96, 192, 384),
        depths: Sequence[int] = (2, 2, 14, 2),  # timm's count: without each stage's downsample and pre_block
        mlp_ratio: int = 2,
        kernel_size: int = 3,
        fuse_chans: int = 256,  # width of the two fusion convs (the neck's input)
        upsample_mode: str = "bicubic",
    ) -> None:
        super().__init__()
        if len(embed_dims) != 4 or len(depths) != 4:
            raise ValueError(f"RepViTEncoder fuses stages 2 and 3 of four; got embed_dims={embed_dims}")
        self.img_size = img_size
        self.out_chans = out_chans
        self.upsample_mode = upsample_mode
        trunk = RepVit(
            in_chans=in_chans,
            img_size=img_size,
            embed_dim=tuple(embed_dims),
            depth=tuple(depths),
            mlp_ratio=mlp_ratio,
            kernel_size=kernel_size,
            num_classes=0,
            act_layer=nn.GELU,
            legacy=True,
        )
        self.stem = trunk.stem  # (B, 3, S, S) -> (B, C0, S/4, S/4)
        self.stages = trunk.stages  # stage i > 0 opens with its RepVitDownsample (pre_block first)
        self.fuse_stage2 = nn.Conv2d(embed_dims[2], fuse_chans, kernel_size=1, bias=False)
        self.fuse_stage3 = nn.Conv2d(embed_dims[3], fuse_chans, kernel_size=1, bias=False)
        self.neck = nn.Sequential(
            nn.Conv2d(fuse_chans, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages[:3](self.stem(x))  # (B, C2, S/16, S/16), before the last width-C2 block
        last = self.stages[3]
        down = last.downsample
        stage2 = down.pre_block(x)  # (B, C2, S/16, S/16): the release's "stage2"
        x = down.channel_downsample(down.spatial_downsample(stage2))  # (B, C3, S/32, S/32)
        stage3 = last.blocks(x + down.ffn(x))  # (B, C3, S/32, S/32): the release's "stage3"
        up = F.interpolate(self.fuse_stage3(stage3), scale_factor=2, mode=self.upsample_mode, align_corners=False)
        return self.neck(self.fuse_stage2(stage2) + up)  # (B, out_chans, S/16, S/16)


def _block_prefixes(depths: Sequence[int]) -> List[Tuple[str, bool]]:
    """timm prefix of the release's `features.1`, `features.2`, ... in order, and whether it is a stride-2 block."""
    out = [(f"stages.0.blocks.{j}", False) for j in range(depths[0])]
    for s in range(1, len(depths)):
        out += [(f"stages.{s}.downsample.pre_block", False), (f"stages.{s}.downsample", True)]
        out += [(f"stages.{s}.blocks.{j}", False) for j in range(depths[s])]
    return out


def _release_depths(sd: Dict[str, torch.Tensor]) -> Tuple[int, ...]:
    """timm's depths from a released state dict: stride-2 blocks are those with a `token_mixer.2` conv."""
    n = 1 + max((int(m[1]) for k in sd if (m := re.match(r"features\.(\d+)\.", k))), default=0)
    down = [i for i in range(1, n) if f"features.{i}.token_mixer.2.c.weight" in sd]
    if not down:
        raise ValueError("EdgeSAM image encoder: missing features.<i>.token_mixer.2.c.weight (no stride-2 block)")
    ends = [d - 1 for d in down] + [n]  # each stage ends before the next one's pre_block
    return tuple([down[0] - 2] + [ends[s + 1] - down[s] - 1 for s in range(len(down))])


def _rename(k: str, pairs: Sequence[Tuple[str, str]]) -> str:
    for a, b in pairs:
        if k.startswith(a):
            return b + k[len(a) :]
    raise ValueError(f"unexpected key in an EdgeSAM image encoder: {k}")


def from_release(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Released image-encoder weights (prefix stripped) -> this module's state_dict."""
    blocks = _block_prefixes(_release_depths(sd))
    out = {}
    for k, v in sd.items():
        m = re.match(r"features\.(\d+)\.(.*)", k)
        if m and int(m[1]) > 0:
            if int(m[1]) > len(blocks):
                raise ValueError(f"unexpected key in an EdgeSAM image encoder: {k}")
            prefix, stride2 = blocks[int(m[1]) - 1]
            out[f"{prefix}.{_rename(m[2], _STRIDE2 if stride2 else _STRIDE1)}"] = v
        elif k.startswith(("fuse_stage2.", "neck.")):
            out[k] = v
        else:
            out[_rename(k, _TOP)] = v
    return out


def to_release(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """This module's state_dict -> the release's layout (nothing to write back: RELEASE_UNUSED is empty)."""
    depths = [len({m[1] for k in sd if (m := re.match(rf"stages\.{s}\.blocks\.(\d+)\.", k))}) for s in range(4)]
    index = {prefix: (i + 1, stride2) for i, (prefix, stride2) in enumerate(_block_prefixes(depths))}
    top = [(b, a) for a, b in _TOP]
    out = {}
    for k, v in sd.items():
        m = re.match(r"(stages\.\d+\.(?:blocks\.\d+|downsample\.pre_block|downsample))\.(.*)", k)
        if m:
            i, stride2 = index[m[1]]
            out[f"features.{i}.{_rename(m[2], [(b, a) for a, b in (_STRIDE2 if stride2 else _STRIDE1)])}"] = v
        elif k.startswith(("fuse_stage2.", "neck.")):
            out[k] = v
        else:
            out[_rename(k, top)] = v
    return out


def release_args(sd: Dict[str, torch.Tensor]) -> dict:
    """Constructor keywords (all but img_size / out_chans) from a released state dict's shapes. The upsampling
    mode has no weights: it stays the release's bicubic."""

    def get(key: str) -> torch.Tensor:
        if key not in sd:
            raise ValueError(f"EdgeSAM image encoder: missing {key}")
        return sd[key]

    depths = _release_depths(sd)
    down = [i + 1 for i, (_, stride2) in enumerate(_block_prefixes(depths)) if stride2]
    embed_dims = [get("features.0.2.c.weight").shape[0]] + [
        get(f"features.{i}.token_mixer.2.c.weight").shape[0] for i in down
    ]
    return dict(
        in_chans=get("features.0.0.c.weight").shape[1],
        embed_dims=tuple(embed_dims),
        depths=depths,
        mlp_ratio=get("features.1.channel_mixer.m.0.c.weight").shape[0] // embed_dims[0],
        kernel_size=get("features.1.token_mixer.0.conv.c.weight").shape[-1],
        fuse_chans=get("fuse_stage2.weight").shape[0],
    )
