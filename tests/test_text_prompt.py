"""The text prompt (SAM paper §7.5, appendix D.5): crop extraction, CLIP sidecars, the text token
in the prompt encoder, checkpoints with and without it against the official package, the
simulation's text rows, the predictor's text= argument."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

import segany
from segany.data.clip_crops import crop_box, mask_box, mask_crop, sample_crop
from segany.data.formats import clip_sidecar
from segany.modeling.constants import PAD, POS, TEXT
from segany.modeling.prompt_encoder import prompt_tokens
from tests._official import build_official_tiny_sam, make_test_image

# a tiny OpenCLIP (random init): ViT and text tower of one / two blocks, 32 px input
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def clip():
    pytest.importorskip("open_clip")
    from segany.modeling.clip import build_clip

    torch.manual_seed(0)
    return build_clip(config=TINY_CLIP)


# ----------------------------------------------------------------------------- crops


def _rect_mask(h=200, w=200, x0=40, y0=50, x1=60, y1=60):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_crop_box_is_the_enlarged_square_around_the_mask():
    m = _rect_mask()  # 20 wide, 10 high, centre (50, 55)
    assert mask_box(m) == (40, 50, 60, 60)
    assert crop_box(mask_box(m), 1.0, 200, 200) == (40, 45, 60, 65)  # side 20
    assert crop_box(mask_box(m), 2.0, 200, 200) == (30, 35, 70, 75)  # side 40
    assert crop_box((0, 0, 10, 10), 2.0, 200, 200) == (0, 0, 15, 15)  # clipped at the image border


def test_sample_crop_enlargement_stays_in_the_range_and_covers_the_mask():
    m = _rect_mask()
    img = np.random.default_rng(0).integers(1, 256, (200, 200, 3), dtype=np.uint8)
    rng = np.random.default_rng(1)
    sides = []
    for _ in range(200):
        crop = sample_crop(img, m, rng, scale=(1.0, 2.0), p_zero_background=0.0)
        assert crop.shape[0] == crop.shape[1]  # square (not clipped here)
        sides.append(crop.shape[0])
    assert 20 <= min(sides) and max(sides) <= 40  # 1x .. 2x the mask's longer side (20 px)
    assert min(sides) < 24 and max(sides) > 36  # the whole range is drawn
    with pytest.raises(ValueError, match="scale"):
        sample_crop(img, m, rng, scale=(0.5, 2.0))


def test_background_zeroing_keeps_the_mask_pixels_and_its_probability():
    m = _rect_mask()
    img = np.random.default_rng(0).integers(1, 256, (200, 200, 3), dtype=np.uint8)  # no zero pixel
    zeroed = mask_crop(img, m, 2.0, True)
    kept = mask_crop(img, m, 2.0, False)
    x0, y0, x1, y1 = 30, 35, 70, 75
    inside = m[y0:y1, x0:x1]
    np.testing.assert_array_equal(kept, img[y0:y1, x0:x1])
    np.testing.assert_array_equal(zeroed[inside], img[y0:y1, x0:x1][inside])
    assert (zeroed[~inside] == 0).all() and inside.sum() == 200
    rng = np.random.default_rng(2)
    n_zeroed = sum(bool((sample_crop(img, m, rng) == 0).any()) for _ in range(400))
    assert 150 < n_zeroed < 250  # p = 0.5 (binomial sd 10)
    assert not any((sample_crop(img, m, rng, p_zero_background=0.0) == 0).any() for _ in range(20))


# ----------------------------------------------------------------------------- sidecars


def test_sidecar_round_trip_and_lookup_by_annotation_id(tmp_path):
    ids = np.array([907, 3, 55, 12], np.int64)
    emb = np.arange(8, dtype=np.float32).reshape(4, 2) / 4  # exact in float16
    path = str(tmp_path / "train-000000.clip.npz")
    assert clip_sidecar.sidecar_path(str(tmp_path / "train-000000.tar")) == path
    clip_sidecar.write(path, ids, emb, {"clip": "x", "min_area": 10000})
    got_ids, got, meta = clip_sidecar.read(path)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got, emb)
    assert meta == {"clip": "x", "min_area": 10000}
    rows = clip_sidecar.lookup(got_ids, got, np.array([12, 4, 907, 3]))
    np.testing.assert_array_equal(rows[[0, 2, 3]], emb[[3, 0, 1]])
    assert np.isnan(rows[1]).all()  # id 4 has no embedding
    with pytest.raises(ValueError, match="repeat"):
        clip_sidecar.write(str(tmp_path / "b.npz"), [1, 1], np.zeros((2, 2)), {})
    (tmp_path / "bad.clip.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.clip.npz"):
        clip_sidecar.read(str(tmp_path / "bad.clip.npz"))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from segany.data.datamodules.synthetic import SyntheticDataModule

    root = tmp_path_factory.mktemp("syn")
    SyntheticDataModule(root=str(root), num_train=4, num_val=6, shard_size=3, min_side=96, max_side=128).prepare_data()
    return root


def test_datamodule_delivers_each_masks_embedding(scenes, tmp_path):
    """A hand-made sidecar whose embedding encodes the annotation id: every delivered mask gets
    the row of its own id, masks left out of the sidecar get none."""
    import glob
    import json
    import shutil

    from segany.data.datamodules.synthetic import SyntheticDataModule
    from segany.data.faults import FaultCounter
    from segany.data.streams.reader import read_pairs

    root = tmp_path / "syn"
    shutil.copytree(scenes, root)
    for shard in sorted(glob.glob(str(root / "val-*.tar"))):
        ids = [a["id"] for p in read_pairs(shard, 0, FaultCounter(5)) for a in json.loads(p.json)["annotations"]]
        listed = np.array(ids[::2], np.int64)  # every other mask has an embedding
        emb = np.stack([listed % 1000, listed // 1000], 1).astype(np.float32)
        clip_sidecar.write(clip_sidecar.sidecar_path(shard), listed, emb, {})
    dm = SyntheticDataModule(
        root=str(root), num_train=4, num_val=6, shard_size=3, min_side=96, max_side=128,
        clip_sidecar=".clip.npz", num_workers=0, batch_size=2, img_size=128,
    )  # fmt: skip
    dm.setup("validate")
    seen = with_emb = 0
    for batch in dm.val_dataloader():
        ids, has, emb = batch["mask_ids"], batch["has_clip"], batch["clip"]
        assert emb.shape[:2] == ids.shape and not has[~batch["valid"]].any()
        for i, h, e in zip(ids[batch["valid"]], has[batch["valid"]], emb[batch["valid"]]):
            seen += 1
            if h:
                with_emb += 1
                assert (int(e[0]), int(e[1])) == (int(i) % 1000, int(i) // 1000)
            else:
                assert (e == 0).all()
    assert seen > 10 and 0 < with_emb < seen


def test_precompute_job_writes_aligned_resumable_sidecars(scenes, tmp_path, clip, monkeypatch):
    import shutil

    from segany.engine import clip_embeddings as job
    from segany.engine.sources import plan_jobs

    root = tmp_path / "syn"
    shutil.copytree(scenes, root)
    monkeypatch.setattr("segany.modeling.clip.build_clip", lambda *a, **k: clip)
    args = ["--input", str(root), "--clip-model", "ViT-B-32", "--min-area", "200", "--batch-size", "3"]
    assert job.main(args) == 0
    jobs = plan_jobs(str(root))
    first = jobs[0]
    ids, emb, meta = clip_sidecar.read(clip_sidecar.sidecar_path(str(root / first.name)))
    assert meta["min_area"] == 200 and meta["scale"] == [1.0, 2.0] and emb.shape[1] == 32
    # every mask with area >= 200 px, in order, and nothing else
    from segany.data.decode import decode_image, decode_mask

    expected, crops = [], []
    rng = np.random.default_rng([0, zlib.crc32(first.name.encode())])
    for item in first.items():
        image = decode_image(item.data, "t")
        for a in item.meta["annotations"]:
            m = decode_mask(a["segmentation"])
            if m.sum() >= 200:
                expected.append(a["id"])
                crops.append(sample_crop(image, m, rng))
    np.testing.assert_array_equal(ids, expected)
    ref = clip.encode_images(crops).numpy()
    np.testing.assert_allclose(emb, ref, atol=2e-3)  # float16 storage
    # a rerun skips the shards that are done
    stamp = (root / "train-000000.clip.npz").stat().st_mtime_ns
    assert job.main(args) == 0
    assert (root / "train-000000.clip.npz").stat().st_mtime_ns == stamp


# ----------------------------------------------------------------------------- CLIP loading


def test_clip_loads_a_local_checkpoint_as_data(clip, tmp_path):
    from segany.modeling.checkpoint import CheckpointError
    from segany.modeling.clip import build_clip

    path = tmp_path / "open_clip_model.pt"
    torch.save(clip.model.state_dict(), path)  # OpenCLIP's release format: a plain state dict
    torch.manual_seed(123)
    loaded = build_clip(config=TINY_CLIP, checkpoint=str(path))
    fresh = build_clip(config=TINY_CLIP)
    img = [np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)]
    assert torch.allclose(loaded.encode_images(img), clip.encode_images(img), atol=1e-6)
    assert torch.allclose(loaded.encode_text(["a photo of a wheel."]), clip.encode_text(["a photo of a wheel."]))
    assert not torch.allclose(fresh.encode_text(["a wheel"]), clip.encode_text(["a wheel"]))
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": clip.model.state_dict(), "x": np.random.default_rng(0)}, evil)
    with pytest.raises(CheckpointError, match="evil.pt"):
        build_clip(config=TINY_CLIP, checkpoint=str(evil))
    with pytest.raises(CheckpointError, match="does not exist"):
        build_clip(config=TINY_CLIP, checkpoint=str(tmp_path / "missing.pt"))


# ----------------------------------------------------------------------------- prompt encoder


def test_text_token_layout_and_embedding():
    torch.manual_seed(0)
    pe = segany.build_sam("vit_tiny", text_embed_dim=8).prompt_encoder
    text = torch.randn(2, 8)
    pts = (torch.tensor([[[10.0, 20.0]], [[30.0, 40.0]]]), torch.ones(2, 1, dtype=torch.long))
    assert prompt_tokens(None, None, text)[1].tolist() == [[TEXT, PAD]] * 2
    assert prompt_tokens(pts, None, text)[1].tolist() == [[TEXT, POS, PAD]] * 2
    assert prompt_tokens(None, torch.zeros(2, 4), text)[1].tolist() == [[TEXT, 2, 3]] * 2
    sparse, _ = pe(points=pts, boxes=None, masks=None, text=text)
    alone, _ = pe(points=pts, boxes=None, masks=None)
    # the text token: its projection plus its type embedding, no positional encoding
    want = pe.text_proj(text) + pe.text_embed.weight
    assert torch.allclose(sparse[:, 0], want, atol=1e-6)
    assert torch.allclose(sparse[:, 1:], alone, atol=1e-6)  # the point and pad tokens unchanged
    off = segany.build_sam("vit_tiny").prompt_encoder
    with pytest.raises(ValueError, match="text_embed_dim=0"):
        off(points=pts, boxes=None, masks=None, text=text)
    with pytest.raises(ValueError, match=r"\(2, 8\)"):
        pe(points=None, boxes=None, masks=None, text=torch.randn(2, 5))
    text_labels = (torch.zeros(2, 2, 2), torch.tensor([[TEXT, PAD]] * 2))  # TEXT tokens, no embeddings
    with pytest.raises(ValueError, match="label 4"):
        off(points=None, boxes=None, masks=None, tokens=text_labels)
    with pytest.raises(ValueError, match="label 4"):
        pe(points=None, boxes=None, masks=None, tokens=text_labels)


def _predict_all(predictor, image):
    predictor.set_image(image)
    out = []
    for kw in (
        dict(point_coords=np.array([[60.0, 70.0]]), point_labels=np.array([1])),
        dict(box=np.array([20.0, 30.0, 110.0, 120.0]), multimask_output=False),
        dict(point_coords=np.array([[200.0, 70.0], [60, 165]]), point_labels=np.array([1, 0])),
    ):
        masks, iou, low = predictor.predict(return_logits=True, **kw)
        out.append((low, iou))
    return out


def test_official_checkpoint_loads_unchanged_with_text_off(tmp_path):
    from segment_anything import SamPredictor as OfficialPredictor

    official = build_official_tiny_sam(seed=3)
    path = tmp_path / "sam_tiny.pth"
    torch.save(official.state_dict(), path)
    ours = segany.build_sam(checkpoint=str(path)).eval()
    assert ours.config.text_embed_dim == 0 and not any("text" in k for k in ours.state_dict())
    image = make_test_image()
    for (a, ia), (b, ib) in zip(
        _predict_all(OfficialPredictor(official), image), _predict_all(segany.SamPredictor(ours), image)
    ):
        np.testing.assert_allclose(a, b, atol=1e-4)
        np.testing.assert_allclose(ia, ib, atol=1e-5)


def test_text_model_exports_and_its_other_prompts_match_the_official_package(tmp_path):
    from segment_anything import SamPredictor as OfficialPredictor

    from segany.modeling.checkpoint import save_official

    torch.manual_seed(0)
    ours = segany.build_sam("vit_tiny", text_embed_dim=32).eval()
    with torch.no_grad():  # zero-initialised encoder tensors randomised, so that loading them counts
        for name, p in ours.image_encoder.named_parameters():
            if name == "pos_embed" or "rel_pos" in name:
                p.copy_(torch.randn_like(p) * 0.02)
    path = tmp_path / "sam_text.pth"
    save_official(ours, str(path))
    sd = torch.load(path, weights_only=True)
    extra = sorted(k for k in sd if k.startswith("prompt_encoder.text_"))
    assert extra == [
        "prompt_encoder.text_embed.weight",
        "prompt_encoder.text_proj.0.bias",
        "prompt_encoder.text_proj.0.weight",
        "prompt_encoder.text_proj.2.bias",
        "prompt_encoder.text_proj.2.weight",
    ]
    # the official package: load without the text keys (documented in experiments/text_prompt.md)
    official = build_official_tiny_sam(seed=9)
    official.load_state_dict({k: v for k, v in sd.items() if k not in extra}, strict=True)
    image = make_test_image()
    for (a, ia), (b, ib) in zip(
        _predict_all(OfficialPredictor(official.eval()), image), _predict_all(segany.SamPredictor(ours), image)
    ):
        np.testing.assert_allclose(a, b, atol=1e-4)
        np.testing.assert_allclose(ia, ib, atol=1e-5)
    # and segany reads the text model back whole (its architecture in the .json beside the .pth)
    back = segany.build_sam(checkpoint=str(path)).eval()
    assert back.config.text_embed_dim == 32
    text = torch.randn(1, 32)
    emb = torch.randn(1, 256, 16, 16)
    with torch.no_grad():
        a = ours.decode(emb, text=text[None])[0]
        b = back.decode(emb, text=text[None])[0]
    assert torch.allclose(a, b, atol=1e-6)


# ----------------------------------------------------------------------------- training / inference


def test_simulation_starts_text_rows_from_the_embedding():
    from segany.testing.toy import toy_batch
    from segany.training import PromptConfig
    from segany.training.losses import SamLoss
    from segany.training.prompting import initial_prompts
    from segany.training.simulation import simulate

    torch.manual_seed(0)
    model = segany.build_sam("vit_tiny", text_embed_dim=16)
    batch = toy_batch(batch_size=2, num_masks=3, img_size=256)
    B, N = batch["valid"].shape
    batch["clip"] = torch.randn(B, N, 16)
    batch["has_clip"] = batch["valid"].clone()
    batch["has_clip"][0, 0] = False
    cfg = PromptConfig(point_rounds=1, mask_rounds=0, p_text=1.0)
    g = torch.Generator().manual_seed(0)
    R = B * N
    pr = initial_prompts(
        batch["masks"].reshape(R, 256, 256), batch["boxes"].reshape(R, 4), batch["valid"].reshape(R),
        batch["input_size"].repeat_interleave(N, 0), cfg, g, batch["clip"].reshape(R, 16), batch["has_clip"].reshape(R),
    )  # fmt: skip
    coords, labels, text = pr.tokens()
    assert labels[0, 0] != TEXT  # no embedding: a point or a box
    assert (labels[1:, 0][batch["valid"].reshape(R)[1:]] == TEXT).all()
    assert (labels[1:, 1][batch["valid"].reshape(R)[1:]] == PAD).all()  # [T, PAD]
    with torch.no_grad():
        emb = model.image_encoder(batch["image"])
    out = simulate(model, emb, batch, cfg, SamLoss(), g)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert model.prompt_encoder.text_proj[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="text_embed_dim"):
        simulate(segany.build_sam("vit_tiny"), emb, batch, cfg, SamLoss(), g)


def test_predictor_text_prompt_runs_end_to_end(clip):
    torch.manual_seed(0)
    model = segany.build_sam("vit_tiny", text_embed_dim=clip.embed_dim).eval()
    pred = segany.SamPredictor(model, clip=clip)
    pred.set_image(make_test_image())
    masks, iou, low = pred.predict(text="a wheel")
    assert masks.shape == (3, 200, 300) and iou.shape == (3,) and low.shape == (3, 64, 64)
    m2, _, low2 = pred.predict(text="a wheel", point_coords=np.array([[60.0, 70.0]]), point_labels=np.array([1]))
    assert m2.shape == (3, 200, 300) and not np.allclose(low, low2)
    no_clip = segany.SamPredictor(model)
    no_clip.set_image(make_test_image())
    with pytest.raises(ValueError, match="CLIP model"):
        no_clip.predict(text="a wheel")


def test_text_token_added_to_a_checkpoint_without_one(tmp_path):
    from segany.modeling.checkpoint import CheckpointError, save_official

    torch.manual_seed(0)
    base = segany.build_sam("vit_tiny").eval()
    path = tmp_path / "base.pth"
    save_official(base, str(path))
    grown = segany.build_sam(checkpoint=str(path), text_embed_dim=16)
    assert grown.config.text_embed_dim == 16
    sd, ref = grown.state_dict(), base.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in ref.items())  # everything else loaded as stored
    assert sorted(set(sd) - set(ref)) == sorted(k for k in sd if k.startswith("prompt_encoder.text_"))
    text_path = tmp_path / "text.pth"
    save_official(grown, str(text_path))
    with pytest.raises(CheckpointError, match="text_embed_dim=8"):  # a stored text width is the architecture
        segany.build_sam(checkpoint=str(text_path), text_embed_dim=8)


def test_text_tasks_are_outside_task_all():
    from omegaconf import OmegaConf

    from segany.evaluation.registry import TASKS, task_names

    assert {"crop_prompts", "text"} <= set(TASKS)
    assert not {"crop_prompts", "text"} & set(task_names(OmegaConf.create({"task": "all"})))
    assert task_names(OmegaConf.create({"task": "text"})) == ["text"]


def test_text_task_scores_hand_made_masks():
    """task=text's metrics on hand-made masks from a stand-in predictor: IoUs by hand, mask AP by
    COCO's 101-point rule (1 TP then 1 FP for 2 instances: 51/101 at every threshold)."""
    from omegaconf import OmegaConf
    from pycocotools import mask as mask_utils

    from segany.evaluation.sources import EvalImage
    from segany.evaluation.text import TextTask

    def box(r0, r1, c0, c1):
        m = np.zeros((20, 20), bool)
        m[r0:r1, c0:c1] = True
        return m

    def ann(i, m, cat):
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode()
        return {
            "id": i,
            "segmentation": rle,
            "area": float(m.sum()),
            "bbox": [0, 0, 1, 1],
            "iscrowd": 0,
            "category_id": cat,
        }

    A, B, C = box(0, 10, 0, 10), box(10, 20, 10, 20), box(5, 15, 5, 15)
    empty = np.zeros((20, 20), bool)
    answers = {  # (image id, phrase) -> 3 masks and their predicted IoUs
        (1, "a photo of a cat."): ([A, empty, box(0, 5, 0, 10)], [0.9, 0.1, 0.5]),  # top = A: IoU 1
        (1, "a photo of a dog."): ([box(10, 15, 10, 20), B, empty], [0.8, 0.7, 0.1]),  # top: IoU 0.5, oracle 1
        (2, "a photo of a cat."): ([box(5, 15, 10, 20), empty, empty], [0.6, 0.2, 0.1]),  # IoU 50/150
    }

    class Stub:  # SamPredictor's predict(text=) on the current image
        def set_image(self, image):
            self.id = int(image[0, 0, 0])

        def predict(self, text):
            masks, pred = answers[(self.id, text)]
            return np.stack(masks), np.array(pred), None

    task = TextTask(OmegaConf.create({"text": {"template": "a photo of a {}."}}), None, "cpu", "")
    task.predictor, task.names = Stub(), {1: "cat", 2: "dog"}
    images = [
        EvalImage("1", 1, np.full((20, 20, 3), 1, np.uint8), [ann(1, A, 1), ann(2, B, 2)]),
        EvalImage("2", 2, np.full((20, 20, 3), 2, np.uint8), [ann(3, C, 1)]),
    ]
    m = task.merge([task.part_images("toy", images)])
    assert m["num_pairs"] == 3 and m["num_images"] == 2
    assert m["miou"] == pytest.approx((1 + 0.5 + 1 / 3) / 3)
    assert m["miou_oracle"] == pytest.approx((1 + 1 + 1 / 3) / 3)
    assert m["hit@0.5"] == pytest.approx(2 / 3)
    cat = 51 / 101  # 'cat': every IoU threshold; 'dog': IoU 0.5 is a TP at 0.50 only
    assert m["AP50"] == pytest.approx((cat + 1) / 2)
    assert m["AP75"] == pytest.approx(cat / 2)
    assert m["AP"] == pytest.approx((cat + 0.1) / 2)
