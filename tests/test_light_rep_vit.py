"""EdgeSAM's image encoder on timm's RepViT against a transcription of the release's model
(tests/reference/edge_sam_rep_vit.py): released layout -> segany layout -> same embedding, and back."""

import pytest
import torch
from helpers import image, randomise

from segany.modeling.light.rep_vit import (
    RELEASE_ANCHOR,
    RELEASE_UNUSED,
    RepViTEncoder,
    from_release,
    release_args,
    to_release,
)
from tests.reference.edge_sam_rep_vit import RepViT


def reference(img_size: int, arch: str = "m1", seed: int = 0) -> RepViT:
    ref = RepViT(arch, img_size=img_size)
    randomise(ref, seed)
    return ref.eval()


def converted(ref: RepViT, img_size: int) -> RepViTEncoder:
    sd = ref.state_dict()
    enc = RepViTEncoder(img_size=img_size, **release_args(sd))
    enc.load_state_dict(from_release(sd), strict=True)
    return enc.eval()


@torch.no_grad()
def check_parity(img_size: int, arch: str = "m1") -> float:
    ref = reference(img_size, arch)
    enc = converted(ref, img_size)
    x = image(img_size)
    want, got = ref(x), enc(x)
    assert got.shape == want.shape == (2, 256, img_size // 16, img_size // 16)
    assert want.std() > 0.5  # LayerNorm'd output: a non-degenerate embedding to compare
    diff = (got - want).abs().max().item()
    assert diff < 1e-4, diff
    return diff


def test_parity_256():
    check_parity(256)


def test_parity_other_widths_m2():
    # RepViT-M2 (64..512, 12 blocks at width 256): the depth and width reading, at 128 px
    check_parity(128, "m2")


@pytest.mark.slow
def test_parity_1024():
    check_parity(1024)


@torch.no_grad()
def test_fused_features_are_the_releases():
    """The stride-16 tap is the release's last width-192 block, inside timm's last stage (its pre_block)."""
    ref = reference(256)
    enc = converted(ref, 256)
    x = image(256)
    want = torch.nn.Sequential(*ref.features[:24])(x)  # stem + blocks 1..23: the release's stage2 output
    got = enc.stages[3].downsample.pre_block(enc.stages[:3](enc.stem(x)))
    assert got.shape == (2, 192, 16, 16)
    assert (got - want).abs().max().item() < 1e-4


def test_round_trip_and_reference_loads_strict():
    sd = reference(256).state_dict()
    back = to_release(from_release(sd))
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].shape == v.shape, k
        assert torch.equal(back[k], v), k
    assert RELEASE_UNUSED == ()
    RepViT("m1", img_size=256).load_state_dict(back, strict=True)


def test_keys_are_timms_and_release_has_the_anchor():
    sd = reference(256).state_dict()
    assert RELEASE_ANCHOR in sd
    ours = RepViTEncoder(img_size=256).state_dict()
    assert RELEASE_ANCHOR not in ours
    for k in (
        "stem.conv1.c.weight",
        "stages.3.downsample.pre_block.token_mixer.conv1.bn.running_var",
        "stages.2.downsample.spatial_downsample.c.weight",
        "stages.2.blocks.0.se.fc1.weight",
        "fuse_stage3.weight",
    ):
        assert k in ours, k
    assert not any(k.startswith("head") for k in ours)
    mapped = from_release(sd)
    assert torch.equal(
        mapped["stages.1.downsample.pre_block.token_mixer.conv.c.weight"], sd["features.3.token_mixer.0.conv.c.weight"]
    )
    assert torch.equal(
        mapped["stages.1.downsample.channel_downsample.c.weight"], sd["features.4.token_mixer.2.c.weight"]
    )
    assert torch.equal(
        mapped["stages.3.blocks.1.channel_mixer.conv2.bn.bias"], sd["features.26.channel_mixer.m.2.bn.bias"]
    )


@pytest.mark.parametrize("arch", ["m1", "m2"])
def test_release_args_rebuilds_the_layout(arch):
    sd = reference(128, arch).state_dict()
    mapped = from_release(sd)
    enc_sd = RepViTEncoder(**release_args(sd)).state_dict()
    assert {k: v.shape for k, v in enc_sd.items()} == {k: v.shape for k, v in mapped.items()}


def test_release_args_values_and_missing_key():
    sd = reference(256).state_dict()
    assert release_args(sd) == dict(
        in_chans=3, embed_dims=(48, 96, 192, 384), depths=(2, 2, 14, 2), mlp_ratio=2, kernel_size=3, fuse_chans=256
    )
    assert release_args(reference(128, "m2").state_dict())["depths"] == (2, 2, 12, 2)
    del sd["fuse_stage2.weight"]
    with pytest.raises(ValueError, match="fuse_stage2.weight"):
        release_args(sd)


def test_unknown_key_is_rejected():
    sd = reference(128).state_dict()
    sd["head.l.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="head.l.weight"):
        from_release(sd)


@pytest.mark.parametrize("img_size", [256, 128])
def test_output_shape(img_size):
    enc = RepViTEncoder(img_size=img_size).eval()
    with torch.no_grad():
        out = enc(image(img_size, batch=1))
    assert out.shape == (1, 256, img_size // 16, img_size // 16)
    assert enc.img_size == img_size and enc.out_chans == 256
