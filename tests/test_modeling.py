"""Parity of segany's SAM with the official `segment_anything` package, and checkpoint I/O."""

from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import segany
from segany.modeling import CheckpointError, build_sam
from segany.modeling.checkpoint import to_official
from segany.modeling.transforms import ResizeLongestSide

sa = pytest.importorskip("segment_anything")
from segment_anything import modeling as om  # noqa: E402
from segment_anything.utils.transforms import ResizeLongestSide as OfficialResize  # noqa: E402

ATOL = 1e-4


def official_tiny(seed: int = 0) -> "om.Sam":
    """The release's classes at segany's vit_tiny size, every tensor randomised."""
    torch.manual_seed(seed)
    enc = om.ImageEncoderViT(
        depth=6,
        embed_dim=192,
        img_size=256,
        mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_heads=3,
        patch_size=16,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=(2, 5),
        window_size=8,
        out_chans=256,
    )
    pe = om.PromptEncoder(embed_dim=256, image_embedding_size=(16, 16), input_image_size=(256, 256), mask_in_chans=16)
    dec = om.MaskDecoder(
        num_multimask_outputs=3,
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
        transformer=om.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
    )
    sam = om.Sam(
        image_encoder=enc,
        prompt_encoder=pe,
        mask_decoder=dec,
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()
    with torch.no_grad():  # zero-initialised tables (pos_embed, rel-pos) would hide bugs: randomise all
        for p in sam.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return sam


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    official = official_tiny()
    path = tmp_path_factory.mktemp("ckpt") / "sam_tiny.pth"
    torch.save(official.state_dict(), path)
    ours = build_sam("vit_tiny", checkpoint=str(path)).eval()
    return official, ours, path


def _prompts():
    g = torch.Generator().manual_seed(1)
    return {
        "one point": dict(points=(torch.rand(3, 1, 2, generator=g) * 256, torch.ones(3, 1, dtype=torch.long))),
        "points": dict(points=(torch.rand(3, 4, 2, generator=g) * 256, torch.tensor([[1, 0, 1, 0]] * 3))),
        "box": dict(
            boxes=torch.tensor([[10.0, 20.0, 100.0, 200.0], [0.0, 0.0, 255.0, 255.0], [50.0, 60.0, 70.0, 90.0]])
        ),
        "box+points": dict(
            points=(torch.rand(3, 2, 2, generator=g) * 256, torch.tensor([[1, 0]] * 3)),
            boxes=torch.tensor([[10.0, 20.0, 100.0, 200.0]] * 3),
        ),
        "mask": dict(
            points=(torch.rand(3, 1, 2, generator=g) * 256, torch.ones(3, 1, dtype=torch.long)),
            masks=torch.randn(3, 1, 64, 64, generator=g),
        ),
        "mask only": dict(masks=torch.randn(3, 1, 64, 64, generator=g)),
    }


@torch.no_grad()
def test_image_embedding_matches_official(pair):
    official, ours, _ = pair
    x = torch.randn(2, 3, 256, 256)
    torch.testing.assert_close(ours.image_encoder(x), official.image_encoder(x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(_prompts()))
@pytest.mark.parametrize("multimask", [False, True])
@torch.no_grad()
def test_prompt_encoder_and_decoder_match_official(pair, name, multimask):
    official, ours, _ = pair
    prompt = {"points": None, "boxes": None, "masks": None, **_prompts()[name]}
    emb = official.image_encoder(torch.randn(1, 3, 256, 256))
    sparse_o, dense_o = official.prompt_encoder(**prompt)
    sparse, dense = ours.prompt_encoder(**prompt)
    torch.testing.assert_close(sparse, sparse_o, atol=ATOL, rtol=0)
    torch.testing.assert_close(dense, dense_o, atol=ATOL, rtol=0)
    pe_o, pe = official.prompt_encoder.get_dense_pe(), ours.prompt_encoder.get_dense_pe()
    torch.testing.assert_close(pe, pe_o, atol=ATOL, rtol=0)
    masks_o, iou_o = official.mask_decoder(emb, pe_o, sparse_o, dense_o, multimask)
    masks, iou = ours.mask_decoder(emb, pe, sparse, dense, multimask)
    assert masks.shape == masks_o.shape == (3, 3 if multimask else 1, 64, 64)
    torch.testing.assert_close(masks, masks_o, atol=ATOL, rtol=0)
    torch.testing.assert_close(iou, iou_o, atol=ATOL, rtol=0)


@torch.no_grad()
def test_sam_forward_matches_official(pair):
    """The release's list-of-dicts API end to end: preprocess, encode, decode, postprocess."""
    official, ours, _ = pair
    g = torch.Generator().manual_seed(2)
    batch = [
        {
            "image": torch.rand(3, 256, 171, generator=g) * 255,
            "original_size": (300, 200),
            "point_coords": torch.rand(2, 3, 2, generator=g) * 170,
            "point_labels": torch.tensor([[1, 0, 1], [1, 1, 0]]),
        },
        {
            "image": torch.rand(3, 192, 256, generator=g) * 255,
            "original_size": (150, 200),
            "boxes": torch.tensor([[5.0, 5.0, 100.0, 150.0]]),
            "mask_inputs": torch.randn(1, 1, 64, 64, generator=g),
        },
    ]
    for multimask in (False, True):
        out_o = official(batch, multimask_output=multimask)
        out = ours(batch, multimask_output=multimask)
        for a, b in zip(out, out_o):
            torch.testing.assert_close(a["low_res_logits"], b["low_res_logits"], atol=ATOL, rtol=0)
            torch.testing.assert_close(a["iou_predictions"], b["iou_predictions"], atol=ATOL, rtol=0)
            # thresholded masks may differ only where the logit is within tolerance of 0
            ours.postprocess_masks(a["low_res_logits"], batch[0]["image"].shape[-2:], (1, 1))
            assert a["masks"].shape == b["masks"].shape
            assert (a["masks"] != b["masks"]).float().mean() < 1e-3


def test_subpixel_upscaling_equals_the_convolutions():
    """MaskDecoder.upscale_masks (matrix products per token) gives the values and the
    gradients of the release's path: output_upscaling as ConvTranspose2d / LayerNorm2d /
    GELU on (N, C, h, w), then hyper_in @ the flattened upscaled features (float64)."""
    dec = build_sam("vit_tiny").mask_decoder.double()
    with torch.no_grad():
        for p in dec.output_upscaling.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    g = torch.Generator().manual_seed(5)
    n, h, w = 3, 5, 7  # non-square: rows and columns not swapped
    src = torch.randn(n, h * w, 256, generator=g, dtype=torch.float64)
    hyper = torch.randn(n, 4, 32, generator=g, dtype=torch.float64)
    grad_out = torch.randn(n, 4, 4 * h, 4 * w, generator=g, dtype=torch.float64)

    def reference(src, hyper):
        up = dec.output_upscaling(src.transpose(1, 2).reshape(n, 256, h, w))  # (n, 32, 4h, 4w)
        return (hyper @ up.flatten(2)).reshape(n, 4, 4 * h, 4 * w)

    results = []
    for f in (reference, lambda s, hy: dec.upscale_masks(s, hy, h, w)):
        s, hy = src.clone().requires_grad_(), hyper.clone().requires_grad_()
        dec.zero_grad()
        out = f(s, hy)
        out.backward(grad_out)
        results.append([out, s.grad, hy.grad] + [p.grad.clone() for p in dec.output_upscaling.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def test_encoder_blocks_are_timms_with_the_rel_pos_attention():
    """Every block is built with RelPosAttention (a module of its own, not a swapped class), and a
    seed gives timm's own VisionTransformerSAM weights, names and random stream."""
    from timm.models.vision_transformer_sam import Attention, VisionTransformerSAM

    from segany.modeling.image_encoder import ImageEncoderViT, RelPosAttention

    args = dict(img_size=64, embed_dim=48, depth=3, num_heads=3, global_attn_indexes=(1,), window_size=2)
    torch.manual_seed(0)
    ours = ImageEncoderViT(**args, out_chans=32)
    after_ours = torch.rand(3)
    torch.manual_seed(0)
    timm_enc = VisionTransformerSAM(
        **args, neck_chans=32, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True, num_classes=0
    )
    assert torch.equal(after_ours, torch.rand(3))
    theirs = timm_enc.state_dict()
    assert list(ours.state_dict()) == list(theirs)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, theirs[k]), k
    for i, blk in enumerate(ours.blocks):
        assert type(blk.attn) is RelPosAttention and isinstance(blk.attn, Attention)
        assert blk.attn.rel_pos_h.shape[0] == (2 * 4 - 1 if i == 1 else 2 * 2 - 1)  # global grid 4x4, window 2x2


@torch.no_grad()
def test_timm_layernorm2d_is_the_releases():
    """timm.layers.LayerNorm2d (the prompt encoder's and the mask decoder's) is the release's
    LayerNorm2d: the same keys, eps 1e-6, the same values also where eps matters (channel
    variance ~1e-6: eps 1e-5 would be off by ~40%)."""
    from segment_anything.modeling.common import LayerNorm2d as ReleaseLayerNorm2d
    from timm.layers import LayerNorm2d

    ours, ref = LayerNorm2d(16).double(), ReleaseLayerNorm2d(16).double()
    assert ours.eps == ref.eps == 1e-6
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["weight", "bias"]
    g = torch.Generator().manual_seed(0)
    ref.weight.copy_(torch.randn(16, generator=g, dtype=torch.float64))
    ref.bias.copy_(torch.randn(16, generator=g, dtype=torch.float64))
    ours.load_state_dict(ref.state_dict())
    for scale in (3.0, 1e-3):
        x = torch.randn(2, 16, 5, 7, generator=g, dtype=torch.float64) * scale + 1
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-10, atol=1e-10)
    assert isinstance(build_sam("vit_tiny").prompt_encoder.mask_downscaling[1], LayerNorm2d)


@torch.no_grad()
def test_batched_decoder_equals_per_image(pair):
    """2 images x 5 prompts in one call == each image decoded alone by the release's decoder."""
    official, ours, _ = pair
    emb = ours.image_encoder(torch.randn(2, 3, 256, 256))  # (2, 256, 16, 16)
    g = torch.Generator().manual_seed(3)
    coords = torch.rand(2, 5, 3, 2, generator=g) * 256
    labels = torch.tensor([1, 0, -1]).expand(2, 5, 3)
    boxes = torch.rand(2, 5, 2, generator=g).mul(100).repeat(1, 1, 2) + torch.tensor([0.0, 0.0, 50.0, 50.0])
    mask_in = torch.randn(2, 5, 64, 64, generator=g)
    masks, iou = ours.decode(emb, coords, labels, boxes, mask_in, multimask_output=True)
    assert masks.shape == (2, 5, 3, 64, 64) and iou.shape == (2, 5, 3)
    for b in range(2):
        sparse, dense = official.prompt_encoder((coords[b], labels[b]), boxes[b], mask_in[b].unsqueeze(1))
        m_o, iou_o = official.mask_decoder(emb[b : b + 1], official.prompt_encoder.get_dense_pe(), sparse, dense, True)
        torch.testing.assert_close(masks[b], m_o, atol=ATOL, rtol=0)
        torch.testing.assert_close(iou[b], iou_o, atol=ATOL, rtol=0)
    all4, iou4 = ours.decode(emb, coords, labels, boxes, mask_in, multimask_output=None)
    torch.testing.assert_close(all4[:, :, 1:], masks)
    torch.testing.assert_close(iou4[:, :, 1:], iou)


@torch.no_grad()
def test_float64_points_accepted_like_the_release(pair):
    official, ours, _ = pair
    coords, labels = torch.rand(2, 3, 2, dtype=torch.float64) * 256, torch.ones(2, 3, dtype=torch.long)
    sparse, _ = ours.prompt_encoder((coords, labels), None, None)
    sparse_o, _ = official.prompt_encoder((coords.float(), labels), None, None)
    assert sparse.dtype == torch.float32
    torch.testing.assert_close(sparse, sparse_o, atol=ATOL, rtol=0)


def test_preprocess_and_resize_match_official(pair):
    official, ours, _ = pair
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (300, 451, 3), dtype=np.uint8)
    ours_t, off_t = ResizeLongestSide(256), OfficialResize(256)
    np.testing.assert_array_equal(ours_t.apply_image(img), off_t.apply_image(img))
    assert ours_t.apply_image(img).shape == (int(300 * 256 / 451 + 0.5), 256, 3)
    pts = rng.random((4, 2)) * 300
    np.testing.assert_allclose(ours_t.apply_coords(pts, (300, 451)), off_t.apply_coords(pts, (300, 451)))
    t = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    # the release's apply_image_torch sizes the output from (B, C) instead of (H, W) (a known bug);
    # segany resizes the longest side like apply_image does
    resized = ours_t.apply_image_torch(t)
    want = F.interpolate(t, (170, 256), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(resized, want)
    resized = resized[0]
    torch.testing.assert_close(ours.preprocess(resized), official.preprocess(resized))
    low = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(
        ours.postprocess_masks(low, resized.shape[-2:], (300, 451)),
        official.postprocess_masks(low, resized.shape[-2:], (300, 451)),
    )


def test_save_official_round_trip(pair, tmp_path):
    official, ours, _ = pair
    out = tmp_path / "segany_export.pth"
    segany.save_official(ours, str(out))
    sd = torch.load(out, weights_only=True)
    fresh = official_tiny(seed=5)
    fresh.load_state_dict(sd, strict=True)  # the release's classes take it unchanged
    for k, v in official.state_dict().items():
        torch.testing.assert_close(sd[k], v, atol=0, rtol=0)
    again = build_sam("vit_tiny", checkpoint=str(out))
    for (k, a), b in zip(again.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.slow  # ~45 s on 2 CPU cores; the small-size parity tests above run by default
def test_vit_b_matches_official_registry(tmp_path):
    """The release's own builder at full size: keys, counts, round trip and the 1024-px embedding."""
    torch.manual_seed(0)
    official = sa.sam_model_registry["vit_b"]().eval()
    sd = official.state_dict()
    assert len(sd) == 314
    path = tmp_path / "sam_vit_b.pth"
    torch.save(sd, path)
    ours = build_sam("vit_b", checkpoint=str(path)).eval()
    assert sum(p.numel() for p in ours.image_encoder.parameters()) == pytest.approx(89.7e6, rel=1e-3)
    assert sum(p.numel() for p in ours.parameters()) == pytest.approx(93.7e6, rel=1e-3)
    x = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        torch.testing.assert_close(ours.image_encoder(x), official.image_encoder(x), atol=ATOL, rtol=0)
    out = tmp_path / "export.pth"
    segany.save_official(ours, str(out))
    sa.sam_model_registry["vit_b"](checkpoint=str(out))  # loads strictly in the release's builder


@pytest.mark.slow
@pytest.mark.parametrize("variant,n_keys,enc_params", [("vit_l", 482, 308e6), ("vit_h", 594, 637e6)])
def test_large_variants_match_official(tmp_path, variant, n_keys, enc_params):
    torch.manual_seed(0)
    official = sa.sam_model_registry[variant]().eval()
    sd = official.state_dict()
    assert len(sd) == n_keys
    path = tmp_path / f"sam_{variant}.pth"
    torch.save(sd, path)
    del sd
    ours = build_sam(variant, checkpoint=str(path)).eval()
    assert sum(p.numel() for p in ours.image_encoder.parameters()) == pytest.approx(enc_params, rel=2e-3)
    x = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        torch.testing.assert_close(ours.image_encoder(x), official.image_encoder(x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant,n_keys", [("vit_b", 314), ("vit_l", 482), ("vit_h", 594)])
def test_official_key_names_and_shapes(variant, n_keys):
    """segany's release-format state_dict has exactly the release's keys and shapes (meta device)."""
    with torch.device("meta"):
        official = getattr(sa, f"build_sam_{variant}")()
        ours = build_sam(variant)
    theirs = {k: tuple(v.shape) for k, v in official.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in to_official(ours.state_dict()).items()}
    assert len(mine) == n_keys
    assert mine == theirs


# --------------------------------------------------------------------------- errors


def test_truncated_checkpoint_is_a_clear_error(pair, tmp_path):
    _, _, path = pair
    cut = tmp_path / "cut.pth"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut.pth.*truncated"):
        build_sam("vit_tiny", checkpoint=str(cut))


def test_foreign_state_dict_lists_missing_and_unexpected(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}, path)
    with pytest.raises(CheckpointError) as e:
        build_sam("vit_tiny", checkpoint=str(path))
    msg = str(e.value)
    assert "resnet.pth" in msg and "missing key(s)" in msg and "2 unexpected key(s)" in msg and "conv1.weight" in msg


def test_wrong_size_checkpoint_lists_wrong_shapes(pair, tmp_path):
    # the checkpoint's architecture is read from its shapes: asking for another size names both
    with pytest.raises(CheckpointError) as e:
        build_sam("vit_tiny", checkpoint=str(pair[2]), embed_dim=96, num_heads=3, depth=7)
    msg = str(e.value)
    assert "stores its architecture" in msg and "embed_dim=192" in msg and "depth=6" in msg
    assert "embed_dim=96" in msg and "depth=7" in msg and "Leave those keys out" in msg


def test_bad_override_fails_before_building():
    with pytest.raises(ValueError, match="unknown build_sam override.*embed_dimm"):
        build_sam("vit_tiny", embed_dimm=3)
    with pytest.raises(ValueError, match="unknown SAM variant"):
        build_sam("vit_x")


# --------------------------------------------------------------------------- MAE init


def test_mae_init_loads_timm_vit_with_resized_pos_embed(tmp_path):
    timm = pytest.importorskip("timm")
    from timm.layers import resample_abs_pos_embed

    mae = timm.create_model("vit_base_patch16_224", pretrained=False)
    sd = mae.state_dict()
    path = tmp_path / "mae_pretrain_vit_base.pth"
    torch.save({"model": sd}, path)
    model = build_sam("vit_b", encoder_init=str(path))
    enc = model.image_encoder.state_dict()
    assert torch.equal(enc["blocks.3.attn.qkv.weight"], sd["blocks.3.attn.qkv.weight"])
    assert torch.equal(enc["blocks.11.mlp.fc2.bias"], sd["blocks.11.mlp.fc2.bias"])
    assert torch.equal(enc["patch_embed.proj.weight"], sd["patch_embed.proj.weight"])
    # independent truth for the 14x14 -> 64x64 resize: timm's own resampler (drops the class token)
    want = resample_abs_pos_embed(
        sd["pos_embed"], (64, 64), num_prefix_tokens=1, interpolation="bicubic", antialias=False
    )  # MAE's own interpolate_pos_embed: plain bicubic
    torch.testing.assert_close(enc["pos_embed"], want[:, 1:].reshape(1, 64, 64, 768), atol=1e-5, rtol=0)
    report = model.encoder_init_report
    assert {"cls_token", "norm.weight", "head.weight"} <= set(report.unused)
    assert "blocks.0.attn.rel_pos_h" in report.not_initialised and "neck.0.weight" in report.not_initialised


def test_mae_init_of_wrong_size_is_a_clear_error(tmp_path):
    timm = pytest.importorskip("timm")
    path = tmp_path / "vit_small.pth"
    torch.save(timm.create_model("vit_small_patch16_224", pretrained=False).state_dict(), path)
    with pytest.raises(CheckpointError, match="vit_small.pth.*does not fit"):
        build_sam("vit_b", encoder_init=str(path))


def test_training_switches_reach_the_modules():
    model = build_sam("vit_tiny", drop_path_rate=0.3, decoder_dropout=0.1, grad_checkpointing=True)
    assert model.image_encoder.grad_checkpointing
    assert model.image_encoder.blocks[-1].drop_path1.drop_prob == pytest.approx(0.3)
    assert model.mask_decoder.transformer.layers[0].cross_attn_token_to_image.dropout == 0.1
    x = torch.randn(1, 3, 256, 256)
    model.train()
    emb = model.encode_image(x)
    emb.sum().backward()
    assert model.image_encoder.blocks[0].attn.qkv.weight.grad is not None


POSTPROCESS_CASES = [
    (256, 64, (171, 256), (200, 300)),
    (1024, 256, (683, 1024), (1200, 1800)),
    (1024, 256, (1024, 577), (1077, 607)),
    (1024, 256, (1024, 768), (1024, 768)),  # original = input size: no second resampling pass
    (1024, 256, (683, 1024), (683, 1024)),
]


@pytest.mark.parametrize("img_size,low,input_size,orig", POSTPROCESS_CASES)
def test_postprocess_masks_is_the_release_formula_bit_for_bit(pair, img_size, low, input_size, orig):
    """Only the kept region is upsampled: the numbers must be identical, not just close."""
    ours = pair[1]
    logits = torch.randn(2, 3, low, low) * 4
    want = F.interpolate(logits, (img_size, img_size), mode="bilinear", align_corners=False)
    want = F.interpolate(want[..., : input_size[0], : input_size[1]], orig, mode="bilinear", align_corners=False)
    saved = ours.image_encoder.img_size
    try:
        ours.image_encoder.img_size = img_size  # postprocess_masks reads only the size
        got = ours.postprocess_masks(logits, input_size, orig)
    finally:
        ours.image_encoder.img_size = saved
    assert torch.equal(got, want)


def test_decoder_shared_image_rows_and_keep(pair):
    """One image and one dense embedding for all rows (the transformer takes the image tokens
    once) equals every row with its own copy; keep= computes masks only for the kept rows."""
    _, ours, _ = pair
    dec, pe_enc = ours.mask_decoder, ours.prompt_encoder
    torch.manual_seed(0)
    emb = torch.randn(1, 256, 16, 16)
    pts = (torch.rand(5, 2, 2) * 256, torch.tensor([[1, 0], [1, 1], [1, -1], [0, 1], [1, 1]]))
    with torch.no_grad():
        sparse, dense = pe_enc(points=pts, boxes=None, masks=None)
        assert dense.stride(0) == 0  # the expanded no-mask embedding: the shared path
        shared = dec.predict_masks(emb, pe_enc.get_dense_pe(), sparse, dense)
        copied = dec.predict_masks(emb, pe_enc.get_dense_pe(), sparse, dense.contiguous() + 0.0)
        torch.testing.assert_close(shared, copied, rtol=1e-5, atol=1e-5)
        keep = torch.tensor([True, False, True, False, False])
        masks, iou = dec.predict_masks(emb, pe_enc.get_dense_pe(), sparse, dense, keep=lambda iou_all: keep)
    torch.testing.assert_close(iou, shared[1])
    torch.testing.assert_close(masks[keep], shared[0][keep])
    assert masks[~keep].isnan().all()


def test_every_decoder_parameter_gets_a_gradient_in_training():
    """Training differentiates every mask-decoder parameter (DDP refuses unused parameters, and an
    FSDP checkpoint has no optimiser state for one); inference's folded attention (no grad) skips
    k_proj.bias, whose gradient is zero in exact arithmetic, so it must not run with gradients."""
    torch.manual_seed(0)
    model = segany.build_sam("vit_tiny")
    emb = torch.randn(2, model.prompt_encoder.embed_dim, 16, 16)
    pts = torch.rand(2, 3, 1, 2) * 200
    masks, iou = model.decode(emb, pts, torch.ones(2, 3, 1, dtype=torch.long), multimask_output=None)
    (masks.mean() + iou.mean()).backward()
    missing = [n for n, p in model.mask_decoder.named_parameters() if p.grad is None]
    assert not missing, missing
    with torch.no_grad():  # the folded inference path gives the same outputs
        m2, i2 = model.decode(emb, pts, torch.ones(2, 3, 1, dtype=torch.long), multimask_output=None)
    assert torch.allclose(m2, masks, atol=1e-4) and torch.allclose(i2, iou, atol=1e-5)
