"""HQ-SAM in segany: parity with the HQ-SAM release's package (`segment_anything_hq`), random
weights, outputs within 1e-4; its checkpoint layout in and out."""

from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn

import segany
from segany.inference.predictor import SamPredictor
from segany.modeling import CheckpointError, build_sam
from segany.modeling.hq import HQ_KEYS
from tests._official import build_official_tiny_sam, make_test_image

hq = pytest.importorskip("segment_anything_hq")
from segment_anything_hq import modeling as hm  # noqa: E402

ATOL = 1e-4


def reference_hq(seed=0, img_size=256, embed_dim=192, depth=6, num_heads=3, global_attn=(2, 5), window=8):
    """The release's HQ-SAM modules (as its build_sam._build_sam puts them together), with the
    vit_tiny geometry by default; random weights, the zero-initialised ones (position embeddings,
    LayerNorm2d affine) randomised too so that loading them is exercised."""
    torch.manual_seed(seed)
    grid = img_size // 16
    sam = hm.Sam(
        image_encoder=hm.ImageEncoderViT(
            depth=depth,
            embed_dim=embed_dim,
            img_size=img_size,
            mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=num_heads,
            patch_size=16,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=global_attn,
            window_size=window,
            out_chans=256,
        ),
        prompt_encoder=hm.PromptEncoder(
            embed_dim=256, image_embedding_size=(grid, grid), input_image_size=(img_size, img_size), mask_in_chans=16
        ),
        mask_decoder=hm.MaskDecoderHQ(
            num_multimask_outputs=3,
            transformer=hm.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
            vit_dim=embed_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in sam.named_parameters():
            if name.endswith("pos_embed") or "rel_pos" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif name.startswith(HQ_KEYS) and p.ndim == 1:  # HQ biases and LayerNorm2d affine
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if name.endswith(".weight") else 0.0))
    return sam.eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The reference HQ-SAM and segany's, loaded from the reference's state dict saved as a .pth
    (the HQ-SAM release's layout: no architecture beside it)."""
    ref = reference_hq()
    path = tmp_path_factory.mktemp("hq") / "sam_hq_tiny.pth"
    torch.save(ref.state_dict(), path)
    ours = build_sam(checkpoint=str(path)).eval()
    return ref, ours, path


def prompts(seed=0, m=3):
    g = torch.Generator().manual_seed(seed)
    coords = torch.rand(m, 2, 2, generator=g) * 200  # (M, P, 2) input frame
    labels = torch.tensor([[1, 0], [1, 1], [0, 1]])[:m]
    boxes = torch.tensor([[20.0, 30.0, 120.0, 150.0], [5.0, 5.0, 250.0, 200.0], [100.0, 60.0, 180.0, 240.0]])[:m]
    return coords, labels, boxes


def test_release_layout_loads_as_hq(pair):
    ref, ours, path = pair
    ck = segany.modeling.checkpoint.read_checkpoint(path)
    assert ck.inferred and ck.model_config["hq_token"] is True
    assert ours.config.hq_token and ours.hq and ours.image_encoder.interm_index == 2
    theirs = {k: v for k, v in ref.state_dict().items()}
    mine = segany.modeling.checkpoint.to_official(ours.state_dict())
    assert sorted(mine) == sorted(theirs)
    for k in theirs:
        torch.testing.assert_close(mine[k], theirs[k], rtol=0, atol=0)


def test_encoder_gives_the_first_global_blocks_output(pair):
    ref, ours, _ = pair
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        emb_r, interm_r = ref.image_encoder(x)
        emb, interm = ours.encode_image(x, return_interm=True)
    torch.testing.assert_close(emb, emb_r, atol=ATOL, rtol=0)
    torch.testing.assert_close(interm, interm_r[0].permute(0, 3, 1, 2), atol=ATOL, rtol=0)


@pytest.mark.parametrize("multimask, hq_token_only", [(False, False), (True, True)])  # decode: all four
def test_sam_forward_matches_reference(pair, multimask, hq_token_only):
    ref, ours, _ = pair
    coords, labels, boxes = prompts()
    torch.manual_seed(3)
    images = [torch.rand(3, 256, 192) * 255, torch.rand(3, 170, 256) * 255]
    batch = [
        {"image": images[0], "original_size": (300, 225), "point_coords": coords, "point_labels": labels},
        {"image": images[1], "original_size": (170, 256), "boxes": boxes},
    ]
    with torch.no_grad():
        out_r = ref(batch, multimask_output=multimask, hq_token_only=hq_token_only)
        out = ours(batch, multimask_output=multimask, hq_token_only=hq_token_only)
    for o, r in zip(out, out_r):
        assert o["low_res_logits"].shape == r["low_res_logits"].shape == (3, 1, 64, 64)
        torch.testing.assert_close(o["low_res_logits"], r["low_res_logits"], atol=ATOL, rtol=0)
        torch.testing.assert_close(o["iou_predictions"], r["iou_predictions"], atol=ATOL, rtol=0)
        # thresholded masks: the same except where a logit is within ATOL of the threshold
        near = (r["low_res_logits"].abs() < 1e-3).any()
        assert near or (o["masks"] == r["masks"]).float().mean() > 0.999


def test_decode_batched_gives_every_token_and_the_releases_combinations(pair):
    """decode over B = 2 images x M = 3 prompts: multimask_output=None gives SAM's 4 masks and the
    HQ one (what training needs); True / False / hq_token_only the reference decoder's outputs."""
    ref, ours, _ = pair
    coords, labels, boxes = prompts()
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        emb, interm_r = ref.image_encoder(x)
        _, interm = ours.encode_image(x, return_interm=True)
        every, iou_every = ours.decode(
            emb,
            coords.expand(2, -1, -1, -1),
            labels.expand(2, -1, -1),
            boxes.expand(2, -1, -1),
            multimask_output=None,
            interm_embeddings=interm,
        )
        assert every.shape == (2, 3, 5, 64, 64) and iou_every.shape == (2, 3, 4)
        for multimask in (False, True):
            for only in (False, True):
                masks, iou = ours.decode(
                    emb,
                    coords.expand(2, -1, -1, -1),
                    labels.expand(2, -1, -1),
                    boxes.expand(2, -1, -1),
                    multimask_output=multimask,
                    interm_embeddings=interm,
                    hq_token_only=only,
                )
                for b in range(2):
                    sparse, dense = ref.prompt_encoder(points=(coords, labels), boxes=boxes, masks=None)
                    m_r, iou_r = ref.mask_decoder(
                        emb[b : b + 1],
                        ref.prompt_encoder.get_dense_pe(),
                        sparse,
                        dense,
                        multimask,
                        only,
                        [interm_r[0][b : b + 1]],
                    )
                    torch.testing.assert_close(masks[b], m_r, atol=ATOL, rtol=0)
                    torch.testing.assert_close(iou[b], iou_r, atol=ATOL, rtol=0)
                    if only:
                        torch.testing.assert_close(every[b, :, 4:], m_r, atol=ATOL, rtol=0)
                    if not multimask and not only:
                        torch.testing.assert_close(every[b, :, :1] + every[b, :, 4:], m_r, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="interm_embeddings"):
        ours.decode(emb, boxes=boxes.expand(2, -1, -1))


@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("hq_token_only", [False, True])
def test_predictor_matches_reference_predictor(pair, multimask, hq_token_only):
    ref, ours, _ = pair
    image = make_test_image()
    p_r, p = hq.SamPredictor(ref), SamPredictor(ours)
    p_r.set_image(image)
    p.set_image(image)
    assert p.interm_features.shape == (1, 192, 16, 16)
    calls = [
        dict(point_coords=np.array([[60.0, 70.0]]), point_labels=np.array([1])),
        dict(
            point_coords=np.array([[200.0, 70.0], [60.0, 160.0]]),
            point_labels=np.array([1, 0]),
            box=np.array([150, 20, 290, 190]),
        ),
    ]
    for kw in calls:
        out_r = p_r.predict(**kw, multimask_output=multimask, return_logits=True, hq_token_only=hq_token_only)
        out = p.predict(**kw, multimask_output=multimask, return_logits=True, hq_token_only=hq_token_only)
        assert out[0].shape == out_r[0].shape == (1, 200, 300)
        for a, b in zip(out, out_r):
            np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_predictor_many_rows_and_iou_filter(pair):
    """predict_torch over more rows than one chunk, and predict_low_res' min_iou filter, equal the
    reference predictor row by row (the HQ features computed once per image)."""
    ref, ours, _ = pair
    image = make_test_image()
    p_r, p = hq.SamPredictor(ref), SamPredictor(ours)
    p_r.set_image(image)
    p.set_image(image)
    g = torch.Generator().manual_seed(1)
    n = 70  # the vit_tiny chunk is 64 rows
    coords, labels = torch.rand(n, 1, 2, generator=g) * 256, torch.ones(n, 1, dtype=torch.int)
    _, iou_r, low_r = p_r.predict_torch(coords, labels, multimask_output=True, return_logits=True)
    _, iou, low = p.predict_torch(coords, labels, multimask_output=True, return_logits=True)
    torch.testing.assert_close(low, low_r, atol=ATOL, rtol=0)
    torch.testing.assert_close(iou, iou_r, atol=ATOL, rtol=0)
    top = iou_r[:, 0].sort().values
    cut = float(top[n // 2 - 1] + top[n // 2]) / 2  # between two rows: no row within ATOL of it
    low_f, iou_f = p.predict_low_res(coords, labels, multimask_output=True, min_iou=cut)
    kept = iou_r[:, 0] > cut
    assert 0 < kept.sum() < n
    torch.testing.assert_close(low_f[kept], low_r[kept], atol=ATOL, rtol=0)
    assert torch.isnan(low_f[~kept]).all()


def test_predictor_batch_of_images_equals_one_by_one(pair):
    """set_torch_image with B = 2 images, 2 x M prompt rows: each image's rows as on their own."""
    _, ours, _ = pair
    torch.manual_seed(5)
    images = torch.rand(2, 3, 256, 192) * 255
    coords, labels, _ = prompts()
    p = SamPredictor(ours)
    p.set_torch_image(images, (256, 192))
    _, iou, low = p.predict_torch(coords.repeat(2, 1, 1), labels.repeat(2, 1), multimask_output=True)
    for b in range(2):
        p.set_torch_image(images[b : b + 1], (256, 192))
        _, iou_b, low_b = p.predict_torch(coords, labels, multimask_output=True)
        torch.testing.assert_close(low[3 * b : 3 * b + 3], low_b, atol=ATOL, rtol=0)
        torch.testing.assert_close(iou[3 * b : 3 * b + 3], iou_b, atol=ATOL, rtol=0)


def test_sam_checkpoint_with_hq_token_adds_fresh_hq_parts(tmp_path):
    """A SAM release .pth + hq_token=True: the SAM weights load as they are, the HQ parts start
    fresh (how HQ training starts: the seed's initialisation). (SAM's own masks change: the HQ token
    takes part in the decoder's token attention.)"""
    official = build_official_tiny_sam(seed=3)
    path = tmp_path / "sam_tiny.pth"
    torch.save(official.state_dict(), path)
    torch.manual_seed(0)
    ours = build_sam("vit_tiny", checkpoint=str(path), hq_token=True).eval()
    assert ours.hq
    torch.manual_seed(0)
    fresh = segany.modeling.sam.assemble(ours.config).state_dict()
    mine = segany.modeling.checkpoint.to_official(ours.state_dict())
    theirs = official.state_dict()
    assert sorted(k for k in mine if not k.startswith(HQ_KEYS)) == sorted(theirs)
    hq_release = sorted(k for k in reference_hq().state_dict() if k.startswith(HQ_KEYS))
    assert sorted(k for k in mine if k.startswith(HQ_KEYS)) == hq_release
    for k, v in mine.items():
        torch.testing.assert_close(v, fresh[k] if k.startswith(HQ_KEYS) else theirs[k], rtol=0, atol=0)
    with torch.no_grad():
        x = torch.randn(1, 3, 256, 256)
        emb, interm = ours.encode_image(x, return_interm=True)
        torch.testing.assert_close(emb, official.image_encoder(x), atol=ATOL, rtol=0)
        masks, iou = ours.decode(emb, boxes=torch.tensor([[[10.0, 20.0, 90.0, 200.0]]]), interm_embeddings=interm)
    assert masks.shape == (1, 1, 1, 64, 64) and torch.isfinite(masks).all()
    # without hq_token the same file is the plain SAM, as before
    assert not build_sam("vit_tiny", checkpoint=str(path)).hq


def test_hq_keywords_reach_the_model_and_come_back_from_the_file(tmp_path):
    """hq_interm_block / hq_compress_dim / hq_hidden_dim: in the modules; a saved model's sidecar
    keeps all three, and without it the widths are read from the tensor shapes (the block is in
    no shape: the release's, the first global-attention block)."""
    model = build_sam("vit_tiny", hq_token=True, hq_interm_block=1, hq_compress_dim=96, hq_hidden_dim=40)
    dec = model.mask_decoder
    assert model.image_encoder.interm_index == 1
    assert tuple(dec.compress_vit_feat[0].weight.shape) == (192, 96, 2, 2)
    assert tuple(dec.embedding_encoder[0].weight.shape) == (256, 40, 2, 2)
    assert tuple(dec.embedding_maskfeature[0].weight.shape) == (40, 32, 3, 3)
    path = tmp_path / "hq.pth"
    segany.save_official(model, str(path))
    assert build_sam(checkpoint=str(path)).config == model.config
    (tmp_path / "hq.json").unlink()
    cfg = build_sam(checkpoint=str(path)).config
    assert (cfg.hq_token, cfg.hq_interm_block, cfg.hq_compress_dim, cfg.hq_hidden_dim) == (True, None, 96, 40)
    with pytest.raises(ValueError, match="hq_interm_block 6 out of range"):
        build_sam("vit_tiny", hq_token=True, hq_interm_block=6)


def test_hq_file_missing_a_tensor_names_the_key(pair, tmp_path):
    ref, _, _ = pair
    sd = ref.state_dict()
    del sd["mask_decoder.hf_mlp.layers.2.bias"]
    path = tmp_path / "bad_hq.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\):\s+mask_decoder\.hf_mlp\.layers\.2\.bias"):
        build_sam(checkpoint=str(path))


def test_hq_token_false_on_an_hq_checkpoint_is_refused(pair):
    _, _, path = pair
    with pytest.raises(CheckpointError, match="hq_token=False"):
        build_sam(checkpoint=str(path), hq_token=False)


def test_export_round_trip_loads_in_the_reference(pair, tmp_path):
    """`python -m segany.export` of an HQ model (a state dict with its architecture beside it) writes
    the release's layout: the reference modules load it strictly and give the same outputs."""
    from segany.export import main

    ref, ours, _ = pair
    saved, out = tmp_path / "trained.pth", tmp_path / "exported.pth"
    segany.save_official(ours, str(saved))
    assert main([str(saved), str(out)]) == 0
    back = reference_hq(seed=7)
    back.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(back.image_encoder(x)[0], ref.image_encoder(x)[0], atol=0, rtol=0)
    assert build_sam(checkpoint=str(out)).config == ours.config


def test_export_of_vit_b_loads_in_the_reference_registry(tmp_path, capsys):
    """Full size: a vit_b HQ model exported, then `sam_model_registry["vit_b"](checkpoint=...)` (which
    loads non-strictly and prints what did not fit): every tensor it holds is the exported one."""
    from segany.export import main

    ours = build_sam("vit_b", hq_token=True)
    saved, out = tmp_path / "vit_b_hq.pth", tmp_path / "sam_hq_vit_b.pth"
    segany.save_official(ours, str(saved))
    assert main([str(saved), str(out)]) == 0
    ref = hq.sam_model_registry["vit_b"](checkpoint=str(out))
    assert "All keys matched successfully" in capsys.readouterr().out  # its non-strict load: nothing left out
    written = torch.load(out, weights_only=True)
    theirs = ref.state_dict()
    assert sorted(theirs) == sorted(written)
    for k in (
        "mask_decoder.hf_mlp.layers.0.weight",
        "mask_decoder.compress_vit_feat.0.weight",
        "image_encoder.blocks.11.mlp.lin2.weight",
    ):
        torch.testing.assert_close(theirs[k], written[k], rtol=0, atol=0)


@pytest.mark.slow
def test_vit_b_predictor_matches_reference(tmp_path):
    """Full size (vit_b, 1024 px): a release-layout vit_b HQ file is inferred as vit_b + hq_token, and
    SamPredictor gives the reference predictor's masks."""
    ref = reference_hq(img_size=1024, embed_dim=768, depth=12, num_heads=12, global_attn=(2, 5, 8, 11), window=14)
    path = tmp_path / "sam_hq_vit_b.pth"
    torch.save(ref.state_dict(), path)
    ours = build_sam(checkpoint=str(path)).eval()
    assert (ours.config.embed_dim, ours.config.hq_token, ours.image_encoder.interm_index) == (768, True, 2)
    image = make_test_image(300, 400)
    p_r, p = hq.SamPredictor(ref), SamPredictor(ours)
    p_r.set_image(image)
    p.set_image(image)
    kw = dict(point_coords=np.array([[200.0, 70.0]]), point_labels=np.array([1]), box=np.array([150, 20, 290, 190]))
    for a, b in zip(p.predict(**kw, return_logits=True), p_r.predict(**kw, return_logits=True)):
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
