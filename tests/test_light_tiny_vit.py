"""MobileSAM's image encoder on timm's TinyViT against a transcription of the release's model
(tests/reference/mobile_sam_tiny_vit.py): released layout -> segany layout -> same embedding, and back."""

import pytest
import torch
from helpers import image, randomise

from segany.modeling.light.tiny_vit import (
    RELEASE_ANCHOR,
    RELEASE_UNUSED,
    TinyViTEncoder,
    from_release,
    release_args,
    to_release,
)
from tests.reference.mobile_sam_tiny_vit import TinyViT

# a TinyViT-11M-like width (448: the release's stride-1 rule) with few blocks, to test release_args
SMALL_11M = dict(embed_dims=(64, 128, 256, 448), depths=(1, 1, 2, 1), num_heads=(2, 4, 8, 14))


def reference(img_size: int, seed: int = 0, **kw) -> TinyViT:
    ref = TinyViT(img_size=img_size, **kw)
    randomise(ref, seed)
    return ref.eval()  # after the weights: the release caches its bias tables (`ab`) on .eval()


def converted(ref: TinyViT, img_size: int) -> TinyViTEncoder:
    sd = ref.state_dict()
    enc = TinyViTEncoder(img_size=img_size, **release_args(sd))
    enc.load_state_dict(from_release(sd), strict=True)
    return enc.eval()


@torch.no_grad()
def check_parity(img_size: int, **kw) -> float:
    ref = reference(img_size, **kw)
    enc = converted(ref, img_size)
    x = image(img_size)
    want, got = ref(x), enc(x)
    assert got.shape == want.shape == (2, 256, img_size // 16, img_size // 16)
    diff = (got - want).abs().max().item()
    assert diff < 1e-4, diff
    return diff


def test_parity_256():
    # 256 px: stage maps 32, 16, 16 against windows 7, 14, 7: every attention stage pads its windows
    check_parity(256)


def test_parity_other_widths_and_stride_rule():
    check_parity(256, **SMALL_11M)


@pytest.mark.slow
def test_parity_1024():
    check_parity(1024)


def test_round_trip_and_reference_loads_strict():
    ref = reference(256)
    sd = ref.state_dict()
    back = to_release(from_release(sd))
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].shape == v.shape, k
        if k not in RELEASE_UNUSED:
            assert torch.equal(back[k], v), k
    assert torch.equal(back["norm_head.weight"], torch.ones(320))
    assert not back["head.weight"].any() and not back["head.bias"].any()
    fresh = TinyViT(img_size=256)
    fresh.load_state_dict(back, strict=True)


def test_keys_are_timms_and_release_has_the_anchor():
    sd = reference(256).state_dict()
    assert RELEASE_ANCHOR in sd
    ours = TinyViTEncoder(img_size=256).state_dict()
    assert RELEASE_ANCHOR not in ours
    assert "stages.3.downsample.conv2.conv.weight" in ours and "patch_embed.conv1.conv.weight" in ours
    assert not any(k.startswith("head") for k in ours)


@pytest.mark.parametrize("kw", [{}, SMALL_11M])
def test_release_args_rebuilds_the_layout(kw):
    sd = reference(256, **kw).state_dict()
    mapped = from_release(sd)
    enc_sd = TinyViTEncoder(**release_args(sd)).state_dict()
    assert {k: v.shape for k, v in enc_sd.items()} == {k: v.shape for k, v in mapped.items()}


def test_release_args_values_and_missing_key():
    sd = reference(256).state_dict()
    args = release_args(sd)
    assert args == dict(
        in_chans=3,
        embed_dims=(64, 128, 160, 320),
        depths=(2, 2, 6, 2),
        num_heads=(2, 4, 5, 10),
        window_sizes=(7, 7, 14, 7),
        mlp_ratio=4.0,
        mbconv_expand_ratio=4.0,
        local_conv_size=3,
        downsample_strides=(2, 2, 1),
    )
    del sd["layers.2.blocks.0.attn.attention_biases"]
    with pytest.raises(ValueError, match="layers.2.blocks.0.attn.attention_biases"):
        release_args(sd)


def test_attention_bias_index_layout_matches_release():
    ref, enc = TinyViT(img_size=256), TinyViTEncoder(img_size=256)
    for i in (1, 2, 3):
        want = ref.layers[i].blocks[0].attn.attention_bias_idxs
        got = enc.stages[i].blocks[0].attn.attention_bias_idxs
        assert torch.equal(got, want), i


@pytest.mark.parametrize("img_size", [256, 128])
def test_output_shape(img_size):
    enc = TinyViTEncoder(img_size=img_size).eval()
    with torch.no_grad():
        out = enc(image(img_size, batch=1))
    assert out.shape == (1, 256, img_size // 16, img_size // 16)
    assert enc.img_size == img_size and enc.out_chans == 256
