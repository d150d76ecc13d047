"""Hugging Face formats both ways: `python -m segany.export --format hf | safetensors` and
`build_sam(checkpoint=<SamModel directory | .safetensors>)`. Truths: transformers' own SamModel
(its outputs, and from_pretrained's loading report), its SamConfig defaults, and the release's
segment_anything builder (strict load of the exported weights)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import segany
from segany.export import main
from segany.modeling.checkpoint import CheckpointError, read_checkpoint
from segany.modeling.checkpoint import hf as hfmap

safetensors_torch = pytest.importorskip("safetensors.torch")

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-4
# the demo model's architecture: vit_tiny with configs/experiment/demo.yaml's model overrides
DEMO = dict(OmegaConf.to_container(OmegaConf.load(ROOT / "configs/experiment/demo.yaml").model))


def _randomised(model):
    torch.manual_seed(1)
    with torch.no_grad():  # zero-initialised tables (pos_embed, rel-pos, biases) would hide a wrong mapping
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def _ours(variant="vit_tiny", **kw):
    torch.manual_seed(0)
    return _randomised(segany.build_sam(variant, **kw))


def _exported(model, tmp_path, fmt="hf", name="sam"):
    pth = tmp_path / f"{name}.pth"
    segany.save_official(model, str(pth))
    out = tmp_path / (f"{name}_hf" if fmt == "hf" else f"{name}.safetensors")
    assert main([str(pth), str(out), "--format", fmt]) == 0
    return out


def _prompts(img_size, m=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    coords = torch.rand(1, m, 3, 2, generator=g) * img_size  # (B, M, P, 2) input-frame pixels
    labels = torch.randint(0, 2, (1, m, 3), generator=g)  # negative / positive
    xy = torch.rand(1, m, 2, 2, generator=g) * img_size
    boxes = torch.cat([xy.min(2).values, xy.max(2).values], -1)  # (B, M, 4) xyxy
    return coords, labels, boxes


@torch.no_grad()
def _assert_same_outputs(ours, theirs, img_size):
    """Image embeddings, then pred_masks / iou_scores for point and box prompts, multimask on/off."""
    x = torch.randn(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(2))  # normalised pixels
    emb = ours.image_encoder(x)
    torch.testing.assert_close(theirs.get_image_embeddings(x), emb, atol=ATOL, rtol=0)
    coords, labels, boxes = _prompts(img_size)
    for multimask in (True, False):
        cases = {
            "points": (dict(point_coords=coords, point_labels=labels), dict(input_points=coords, input_labels=labels)),
            "boxes": (dict(boxes=boxes), dict(input_boxes=boxes)),
        }
        for name, (mine, hfs) in cases.items():
            masks, iou = ours.decode(emb, multimask_output=multimask, **mine)  # (B, M, K, 4h, 4w), (B, M, K)
            out = theirs(image_embeddings=emb, multimask_output=multimask, **hfs)
            assert out.pred_masks.shape == masks.shape, name
            torch.testing.assert_close(out.pred_masks, masks, atol=ATOL, rtol=0, msg=f"{name} {multimask}")
            torch.testing.assert_close(out.iou_scores, iou, atol=ATOL, rtol=0, msg=f"{name} {multimask}")


def _from_pretrained(path):
    transformers = pytest.importorskip("transformers")
    model, info = transformers.SamModel.from_pretrained(str(path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


# ----------------------------------------------------------------- segany -> SamModel


def test_demo_size_export_runs_in_transformers_as_in_segany(tmp_path):
    ours = _ours(**DEMO)
    out = _exported(ours, tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    _assert_same_outputs(ours, _from_pretrained(out), DEMO["img_size"])


def test_exported_processor_preprocesses_as_segany(tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = _ours(**DEMO)
    processor = transformers.SamProcessor.from_pretrained(str(_exported(ours, tmp_path)))
    s = DEMO["img_size"]
    img = torch.randint(0, 256, (s, s * 2 // 3, 3), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    theirs = processor(images=img.numpy(), return_tensors="pt")["pixel_values"]  # at its size: no resampling
    mine = ours.preprocess(img.permute(2, 0, 1).float())  # normalised, zero-padded bottom / right
    torch.testing.assert_close(theirs, mine[None], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_vit_b_export_runs_in_transformers_as_in_segany(tmp_path):
    ours = _ours("vit_b")
    _assert_same_outputs(ours, _from_pretrained(_exported(ours, tmp_path)), 1024)


def test_round_trip_through_a_sammodel_directory_is_bit_identical(tmp_path):
    ours = _ours(**DEMO, iou_head_depth=4, decoder_depth=3)  # a deeper IoU head: proj_in, layers.0-1, proj_out
    out = _exported(ours, tmp_path)
    ck = read_checkpoint(out)
    assert ck.kind == "hf" and not ck.inferred
    back = segany.build_sam(checkpoint=str(out))
    assert back.config == ours.config
    ref = ours.state_dict()
    assert back.state_dict().keys() == ref.keys()
    for k, v in back.state_dict().items():
        assert torch.equal(v, ref[k]), k


# ----------------------------------------------------------------- SamModel -> segany


def _hf_demo_config(transformers, **decoder):
    return transformers.SamConfig(
        vision_config=dict(
            hidden_size=192,
            num_hidden_layers=6,
            num_attention_heads=3,
            global_attn_indexes=[2, 5],
            image_size=192,
            window_size=6,
            output_channels=128,
            num_pos_feats=64,
        ),
        prompt_encoder_config=dict(hidden_size=128, image_size=192),
        mask_decoder_config=dict(hidden_size=128, num_attention_heads=4, mlp_dim=1024, **decoder),
    )


@pytest.fixture(scope="module")
def hf_demo():
    """A transformers SamModel of the demo size, every tensor random; its decoder LayerNorm eps
    is transformers' default, 1e-6, as in its converted checkpoints (segany computes 1e-5)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return _randomised(transformers.SamModel(_hf_demo_config(transformers)))


@pytest.mark.parametrize("sharded", [False, True])
def test_samodel_saved_by_transformers_builds_the_same_model(tmp_path, hf_demo, sharded):
    theirs = hf_demo
    theirs.save_pretrained(tmp_path, max_shard_size="4MB" if sharded else "5GB")
    assert (tmp_path / hfmap.HF_INDEX).is_file() == sharded
    ours = segany.build_sam(checkpoint=str(tmp_path)).eval()
    assert ours.config == segany.build_sam("vit_tiny", **DEMO).config
    _assert_same_outputs(ours, theirs, 192)


def test_samconfig_defaults_are_transformers_own():
    transformers = pytest.importorskip("transformers")
    for ours, cls in (
        (hfmap.VISION_DEFAULTS, transformers.SamVisionConfig),
        (hfmap.PROMPT_DEFAULTS, transformers.SamPromptEncoderConfig),
        (hfmap.DECODER_DEFAULTS, transformers.SamMaskDecoderConfig),
    ):
        theirs = cls()
        for k, v in ours.items():
            expected = getattr(theirs, k)
            if k == "mlp_dim" and v is None:  # the encoder's: mlp_ratio x hidden_size, which transformers fills in
                v = int(ours["mlp_ratio"] * ours["hidden_size"])
            assert (list(v) if isinstance(v, (list, tuple)) else v) == (
                list(expected) if isinstance(expected, (list, tuple)) else expected
            ), (cls.__name__, k)


# ----------------------------------------------------------------- .safetensors


def test_safetensors_export_reads_back_and_loads_in_the_release(tmp_path):
    ours = _ours()
    out = _exported(ours, tmp_path, "safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sam.json", "sam.pth", "sam.safetensors"]
    raw = safetensors_torch.load_file(str(out))
    assert any(".mlp.lin1." in k for k in raw) and not any(".mlp.fc1." in k for k in raw)  # release names
    back = segany.build_sam(checkpoint=str(out))
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    # the release's own classes at this size take the file strictly
    pytest.importorskip("segment_anything")
    from tests._official import build_official_tiny_sam

    official = build_official_tiny_sam()
    official.load_state_dict(raw, strict=True)
    off = official.state_dict()
    assert all(torch.equal(off[k], raw[k]) for k in raw)
    # without its sidecar the architecture comes from the shapes
    (tmp_path / "sam.json").unlink()
    ck = read_checkpoint(out)
    assert ck.inferred and ck.model_config["img_size"] == 256


@pytest.mark.slow
def test_vit_b_safetensors_loads_in_the_release_builder(tmp_path):
    sa = pytest.importorskip("segment_anything")
    ours = segany.build_sam("vit_b")
    out = tmp_path / "sam_vit_b.safetensors"
    from segany.modeling.checkpoint.write import write_safetensors

    write_safetensors(ours.state_dict(), str(out), ours.config)
    release = sa.sam_model_registry["vit_b"]()
    release.load_state_dict(safetensors_torch.load_file(str(out)), strict=True)
    ref = ours.state_dict()
    for k, v in release.state_dict().items():
        assert torch.equal(v, ref[k.replace(".mlp.lin", ".mlp.fc") if k.startswith("image_encoder.") else k]), k


# ----------------------------------------------------------------- bad input


def _write_hf(tmp_path, model=None):
    out = tmp_path / "hf"
    from segany.modeling.checkpoint.write import write_hf

    model = model or segany.build_sam("vit_tiny")
    write_hf(model.state_dict(), str(out), model.config)
    return out


def test_wrong_model_type_names_the_file_and_field(tmp_path):
    out = _write_hf(tmp_path)
    cfg = (out / "config.json").read_text().replace('"model_type": "sam"', '"model_type": "sam2"')
    (out / "config.json").write_text(cfg)
    with pytest.raises(CheckpointError, match=r"config\.json.*model_type='sam2'"):
        segany.build_sam(checkpoint=str(out))


def test_an_unbuildable_setting_names_the_field(tmp_path):
    out = _write_hf(tmp_path)
    cfg = (out / "config.json").read_text().replace('"hidden_act": "gelu"', '"hidden_act": "relu"', 1)
    (out / "config.json").write_text(cfg)
    with pytest.raises(CheckpointError, match=r"vision_config\.hidden_act='relu'"):
        read_checkpoint(out)


def test_missing_tensor_names_the_key_and_the_file(tmp_path):
    out = _write_hf(tmp_path)
    sd = safetensors_torch.load_file(str(out / "model.safetensors"))
    del sd["mask_decoder.iou_prediction_head.proj_out.bias"]
    safetensors_torch.save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*missing.*iou_prediction_head\.proj_out\.bias"):
        read_checkpoint(out)


def test_corrupt_safetensors_names_the_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        read_checkpoint(bad)


def test_what_samodel_cannot_hold_is_refused_before_writing(tmp_path):
    model = segany.build_sam("vit_tiny", text_embed_dim=32)
    with pytest.raises(CheckpointError, match="text_embed_dim=32"):
        _write_hf(tmp_path, model)
    assert not (tmp_path / "hf").exists()


def test_a_dcp_directory_with_a_config_json_is_not_taken_for_samodel(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert hfmap.is_hf_dir(tmp_path)
    (tmp_path / ".metadata").write_bytes(b"")
    assert not hfmap.is_hf_dir(tmp_path)


def test_reading_a_samodel_directory_needs_no_transformers(tmp_path):
    out = _write_hf(tmp_path)
    code = (
        "import sys, segany; m = segany.build_sam(checkpoint=sys.argv[1]); "
        "assert m.config.img_size == 256; print(sorted(k for k in sys.modules if k.split('.')[0] == 'transformers'))"
    )
    r = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
