"""Test-only transcription of EfficientViT-SAM's image encoder (the independent truth for parity tests).

Source: github.com/mit-han-lab/efficientvit, commit de7d7733cc0329f391b33f1f459271562ec27bd5:
  efficientvit/models/nn/ops.py          ConvLayer, UpSampleLayer, IdentityLayer, MBConv, FusedMBConv, ResBlock,
                                         LiteMLA, EfficientViTBlock, ResidualBlock, DAGBlock, OpSequential
  efficientvit/models/nn/norm.py         LayerNorm2d, set_norm_eps
  efficientvit/models/nn/act.py          "gelu" = nn.GELU(approximate="tanh")
  efficientvit/models/efficientvit/backbone.py  EfficientViTLargeBackbone, efficientvit_backbone_l0/l1/l2
  efficientvit/models/efficientvit/sam.py       SamNeck, EfficientViTSamImageEncoder, efficientvit_sam_l0/l1/l2/xl0
  efficientvit/sam_model_zoo.py          every norm's eps set to 1e-6 after building

Only what the encoder's forward pass needs, with the original parameter names and module structure (so
`state_dict()` has the released layout under "image_encoder."). Registries (build_norm / build_act by name) are
replaced by the classes they resolve to; the dropout / pre_norm / post_act slots, which the SAM models never
fill, are left out. One addition: SamNeck's `upsample_size` (the release hard-codes (64, 64), the grid of its
512 px input) so that tests can run small inputs.
"""

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

GELU = partial(nn.GELU, approximate="tanh")


def _tuple(x, n):
    x = list(x) if isinstance(x, (list, tuple)) else [x]
    return tuple(x + [x[-1]] * (n - len(x)))


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        out = x - torch.mean(x, dim=1, keepdim=True)
        out = out / torch.sqrt(torch.square(out).mean(dim=1, keepdim=True) + self.eps)
        if self.elementwise_affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out


class ConvLayer(nn.Module):
    def __init__(
        self, in_channels, out_channels, kernel_size=3, stride=1, groups=1, use_bias=False, norm=True, act=None
    ):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=use_bias
        )
        self.norm = nn.BatchNorm2d(out_channels) if norm else None
        self.act = act() if act is not None else None

    def forward(self, x):
        x = self.conv(x)
        if self.norm:
            x = self.norm(x)
        if self.act:
            x = self.act(x)
        return x


class UpSampleLayer(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.size = [size, size]  # a list: the release's same-size shortcut (tuple == list) never fires

    def forward(self, x):
        if tuple(x.shape[-2:]) == self.size:
            return x
        return F.interpolate(x, size=self.size, mode="bicubic", align_corners=False)


class IdentityLayer(nn.Module):
    def forward(self, x):
        return x


class MBConv(nn.Module):
    def __init__(
        self, in_channels, out_channels, stride=1, expand_ratio=6, use_bias=False, norm=True, act=(GELU, GELU, None)
    ):
        super().__init__()
        use_bias, norm, act = _tuple(use_bias, 3), _tuple(norm, 3), _tuple(act, 3)
        mid = round(in_channels * expand_ratio)
        self.inverted_conv = ConvLayer(in_channels, mid, 1, use_bias=use_bias[0], norm=norm[0], act=act[0])
        self.depth_conv = ConvLayer(mid, mid, 3, stride, groups=mid, use_bias=use_bias[1], norm=norm[1], act=act[1])
        self.point_conv = ConvLayer(mid, out_channels, 1, use_bias=use_bias[2], norm=norm[2], act=act[2])

    def forward(self, x):
        return self.point_conv(self.depth_conv(self.inverted_conv(x)))


class FusedMBConv(nn.Module):
    def __init__(
        self, in_channels, out_channels, stride=1, expand_ratio=6, use_bias=False, norm=True, act=(GELU, None)
    ):
        super().__init__()
        use_bias, norm, act = _tuple(use_bias, 2), _tuple(norm, 2), _tuple(act, 2)
        mid = round(in_channels * expand_ratio)
        self.spatial_conv = ConvLayer(in_channels, mid, 3, stride, use_bias=use_bias[0], norm=norm[0], act=act[0])
        self.point_conv = ConvLayer(mid, out_channels, 1, use_bias=use_bias[1], norm=norm[1], act=act[1])

    def forward(self, x):
        return self.point_conv(self.spatial_conv(x))


class ResBlock(nn.Module):
    def __init__(
        self, in_channels, out_channels, stride=1, expand_ratio=1, use_bias=False, norm=True, act=(GELU, None)
    ):
        super().__init__()
        use_bias, norm, act = _tuple(use_bias, 2), _tuple(norm, 2), _tuple(act, 2)
        mid = round(in_channels * expand_ratio)
        self.conv1 = ConvLayer(in_channels, mid, 3, stride, use_bias=use_bias[0], norm=norm[0], act=act[0])
        self.conv2 = ConvLayer(mid, out_channels, 3, 1, use_bias=use_bias[1], norm=norm[1], act=act[1])

    def forward(self, x):
        return self.conv2(self.conv1(x))


class LiteMLA(nn.Module):
    """Multi-scale ReLU linear attention; qkv conv without norm, proj conv with BatchNorm."""

    def __init__(self, in_channels, out_channels, dim=8, scales=(5,), eps=1.0e-15):
        super().__init__()
        self.eps = eps
        heads = int(in_channels // dim)
        total_dim = heads * dim
        self.dim = dim
        self.qkv = ConvLayer(in_channels, 3 * total_dim, 1, norm=False)
        self.aggreg = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(3 * total_dim, 3 * total_dim, s, padding=s // 2, groups=3 * total_dim, bias=False),
                    nn.Conv2d(3 * total_dim, 3 * total_dim, 1, groups=3 * heads, bias=False),
                )
                for s in scales
            ]
        )
        self.kernel_func = nn.ReLU(inplace=False)
        self.proj = ConvLayer(total_dim * (1 + len(scales)), out_channels, 1)

    def _split(self, qkv):
        B, _, H, W = qkv.shape
        qkv = torch.reshape(qkv, (B, -1, 3 * self.dim, H * W))
        q, k, v = qkv[:, :, 0 : self.dim], qkv[:, :, self.dim : 2 * self.dim], qkv[:, :, 2 * self.dim :]
        return self.kernel_func(q), self.kernel_func(k), v

    def relu_linear_att(self, qkv):
        B, _, H, W = qkv.shape
        q, k, v = self._split(qkv)
        v = F.pad(v, (0, 0, 0, 1), mode="constant", value=1)
        out = torch.matmul(torch.matmul(v, k.transpose(-1, -2)), q)
        out = out[:, :, :-1] / (out[:, :, -1:] + self.eps)
        return torch.reshape(out, (B, -1, H, W))

    def relu_quadratic_att(self, qkv):
        B, _, H, W = qkv.shape
        q, k, v = self._split(qkv)
        att_map = torch.matmul(k.transpose(-1, -2), q)  # b h n n
        att_map = att_map / (torch.sum(att_map, dim=2, keepdim=True) + self.eps)
        return torch.reshape(torch.matmul(v, att_map), (B, -1, H, W))

    def forward(self, x):
        qkv = self.qkv(x)
        qkv = torch.cat([qkv] + [op(qkv) for op in self.aggreg], dim=1)
        H, W = qkv.shape[-2:]
        out = self.relu_linear_att(qkv) if H * W > self.dim else self.relu_quadratic_att(qkv)
        return self.proj(out)


class ResidualBlock(nn.Module):
    def __init__(self, main, shortcut):
        super().__init__()
        self.main = main
        self.shortcut = shortcut

    def forward(self, x):
        if self.shortcut is None:
            return self.main(x)
        return self.main(x) + self.shortcut(x)


class EfficientViTBlock(nn.Module):
    def __init__(self, in_channels, dim=32, expand_ratio=4, scales=(5,), act=GELU):
        super().__init__()
        self.context_module = ResidualBlock(LiteMLA(in_channels, in_channels, dim=dim, scales=scales), IdentityLayer())
        mb = MBConv(
            in_channels,
            in_channels,
            expand_ratio=expand_ratio,
            use_bias=(True, True, False),
            norm=(False, False, True),
            act=(act, act, None),
        )
        self.local_module = ResidualBlock(mb, IdentityLayer())

    def forward(self, x):
        return self.local_module(self.context_module(x))


class OpSequential(nn.Module):
    def __init__(self, op_list):
        super().__init__()
        self.op_list = nn.ModuleList([op for op in op_list if op is not None])

    def forward(self, x):
        for op in self.op_list:
            x = op(x)
        return x


class EfficientViTLargeBackbone(nn.Module):
    def __init__(
        self, width_list, depth_list, block_list=None, expand_list=None, fewer_norm_list=None, in_channels=3, qkv_dim=32
    ):
        super().__init__()
        block_list = ["res", "fmb", "fmb", "mb", "att"] if block_list is None else block_list
        expand_list = [1, 4, 4, 4, 6] if expand_list is None else expand_list
        fewer_norm_list = [False, False, False, True, True] if fewer_norm_list is None else fewer_norm_list

        stage0 = [ConvLayer(in_channels, width_list[0], 3, 2, act=GELU)]
        for _ in range(depth_list[0]):
            block = self.build_local_block(
                block_list[0], width_list[0], width_list[0], 1, expand_list[0], fewer_norm_list[0]
            )
            stage0.append(ResidualBlock(block, IdentityLayer()))
        in_channels = width_list[0]
        stages = [OpSequential(stage0)]
        for stage_id, (w, d) in enumerate(zip(width_list[1:], depth_list[1:]), start=1):
            down = "mb" if block_list[stage_id] not in ["mb", "fmb"] else block_list[stage_id]
            stage = [
                ResidualBlock(
                    self.build_local_block(
                        down, in_channels, w, 2, expand_list[stage_id] * 4, fewer_norm_list[stage_id]
                    ),
                    None,
                )
            ]
            in_channels = w
            for _ in range(d):
                if block_list[stage_id].startswith("att"):
                    scales = (3,) if block_list[stage_id] == "att@3" else (5,)
                    stage.append(EfficientViTBlock(w, dim=qkv_dim, expand_ratio=expand_list[stage_id], scales=scales))
                else:
                    block = self.build_local_block(
                        block_list[stage_id], w, w, 1, expand_list[stage_id], fewer_norm_list[stage_id]
                    )
                    stage.append(ResidualBlock(block, IdentityLayer()))
            stages.append(OpSequential(stage))
        self.stages = nn.ModuleList(stages)

    @staticmethod
    def build_local_block(block, in_channels, out_channels, stride, expand_ratio, fewer_norm):
        if block == "res":
            return ResBlock(
                in_channels,
                out_channels,
                stride,
                use_bias=(True, False) if fewer_norm else False,
                norm=(False, True) if fewer_norm else True,
            )
        if block == "fmb":
            return FusedMBConv(
                in_channels,
                out_channels,
                stride,
                expand_ratio,
                use_bias=(True, False) if fewer_norm else False,
                norm=(False, True) if fewer_norm else True,
            )
        if block == "mb":
            return MBConv(
                in_channels,
                out_channels,
                stride,
                expand_ratio,
                use_bias=(True, True, False) if fewer_norm else False,
                norm=(False, False, True) if fewer_norm else True,
            )
        raise ValueError(block)

    def forward(self, x):
        output_dict = {"input": x}
        for stage_id, stage in enumerate(self.stages):
            output_dict["stage%d" % stage_id] = x = stage(x)
        output_dict["stage_final"] = x
        return output_dict


class SamNeck(nn.Module):
    """The release's DAGBlock specialised to SamNeck: inputs summed ("add"), no post_input, one output."""

    def __init__(self, fid_list, in_channel_list, head_width, head_depth, expand_ratio, out_dim=256, upsample_size=64):
        super().__init__()
        self.input_keys = list(fid_list)
        self.input_ops = nn.ModuleList(
            [OpSequential([ConvLayer(c, head_width, 1), UpSampleLayer(upsample_size)]) for c in in_channel_list]
        )
        middle = [
            ResidualBlock(FusedMBConv(head_width, head_width, expand_ratio=expand_ratio), IdentityLayer())
            for _ in range(head_depth)
        ]
        self.middle = OpSequential(middle)
        self.output_keys = ["sam_encoder"]
        self.output_ops = nn.ModuleList([OpSequential([ConvLayer(head_width, out_dim, 1, use_bias=True, norm=False)])])

    def forward(self, feature_dict):
        feat = [op(feature_dict[key]) for key, op in zip(self.input_keys, self.input_ops)]
        total = feat[-1]
        for f in reversed(feat[:-1]):  # list_sum: feat[0] + (feat[1] + (... + feat[-1]))
            total = f + total
        feat = self.middle(total)
        for key, op in zip(self.output_keys, self.output_ops):
            feature_dict[key] = op(feat)
        return feature_dict


class EfficientViTSamImageEncoder(nn.Module):
    def __init__(self, backbone, neck):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.norm = LayerNorm2d(256)

    def forward(self, x):
        return self.norm(self.neck(self.backbone(x))["sam_encoder"])


def set_norm_eps(model, eps):
    for m in model.modules():
        if isinstance(m, (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._BatchNorm)):
            m.eps = eps


L_DEPTHS = {"l0": ([1, 1, 1, 4, 4], 4), "l1": ([1, 1, 1, 6, 6], 8), "l2": ([1, 2, 2, 8, 8], 12)}


def efficientvit_sam_encoder(name="l0", upsample_size=64):
    """The image encoder of efficientvit_sam_<name> as built by the model zoo (norm eps 1e-6)."""
    if name in L_DEPTHS:
        depths, head_depth = L_DEPTHS[name]
        backbone = EfficientViTLargeBackbone([32, 64, 128, 256, 512], depths)
        neck = SamNeck(["stage4", "stage3", "stage2"], [512, 256, 128], 256, head_depth, 1, upsample_size=upsample_size)
    elif name == "xl0":
        backbone = EfficientViTLargeBackbone(
            [32, 64, 128, 256, 512, 1024],
            [0, 1, 1, 2, 3, 3],
            ["res", "fmb", "fmb", "fmb", "att@3", "att@3"],
            [1, 4, 4, 4, 4, 6],
            [False, False, False, False, True, True],
        )
        neck = SamNeck(["stage5", "stage4", "stage3"], [1024, 512, 256], 256, 6, 4, upsample_size=upsample_size)
    else:
        raise ValueError(name)
    encoder = EfficientViTSamImageEncoder(backbone, neck)
    set_norm_eps(encoder, 1e-6)
    return encoder
