"""Synthetic shards, Hydra configs, and the datamodule inside a real Lightning fit/resume."""

import json
import logging
import os

import cv2
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from pycocotools import mask as mask_utils

from segany.data import CocoDataModule, SA1BDataModule, SyntheticDataModule
from segany.data.make_shards import main as make_shards
from segany.data.scenes import GENERATOR_VERSION, _line, _small, make_scene, mask_width, scene_samples
from segany.data.streams.loader import worker_states

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs", "data")


def synthetic(root, **kw):
    args = dict(
        root=str(root),
        num_train=12,
        num_val=4,
        shard_size=5,
        min_side=40,
        max_side=64,
        img_size=64,
        batch_size=2,
        num_workers=0,
    )
    args.update(kw)
    return SyntheticDataModule(**args)


def test_scenes_are_deterministic_and_have_exact_masks():
    a = list(scene_samples(3, seed=1, min_side=40, max_side=64))
    b = list(scene_samples(3, seed=1, min_side=40, max_side=64))
    assert [x[2] for x in a] == [x[2] for x in b] and [x[3] for x in a] == [x[3] for x in b]
    for key, ext, _, meta in a:
        anns = meta["annotations"]
        assert 1 <= len(anns) <= 8 and ext == "jpg"
        assert len({a["id"] for a in anns}) == len(anns)
        assert all(a["area"] >= 10 for a in anns)  # min_visible


def test_prepare_data_generates_once_with_held_out_val(tmp_path):
    dm = synthetic(tmp_path / "syn")
    dm.prepare_data()
    files = sorted(os.listdir(tmp_path / "syn"))
    assert files == ["manifest.json", "train-000000.tar", "train-000001.tar", "train-000002.tar", "val-000000.tar"]
    stamp = os.path.getmtime(tmp_path / "syn" / "train-000000.tar")
    dm2 = synthetic(tmp_path / "syn")
    dm2.prepare_data()  # already there: untouched
    assert os.path.getmtime(tmp_path / "syn" / "train-000000.tar") == stamp
    dm2.setup("fit")
    train_ids = {k for b in dm2.train_dataloader() for k in b["image_id"]}
    val_ids = {k for b in dm2.val_dataloader() for k in b["image_id"]}
    assert val_ids == {f"sa_{i}" for i in range(12, 16)} and not train_ids & val_ids
    assert len(dm2.train_dataloader()) == 12 // 2


def test_make_shards_cli_synthetic(tmp_path, capsys):
    make_shards(["synthetic", str(tmp_path), "--num", "4", "--shard-size", "3", "--min-side", "40", "--max-side", "48"])
    assert "wrote 4 scenes to 2 shards" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["train-000000.tar", "train-000001.tar"]


@pytest.mark.parametrize(
    "name,cls", [("sa1b", SA1BDataModule), ("coco", CocoDataModule), ("synthetic", SyntheticDataModule)]
)
def test_configs_instantiate(name, cls, tmp_path):
    cfg = OmegaConf.create(
        {
            "paths": {"data_dir": str(tmp_path)},  # as configs/paths provides it
            "data": OmegaConf.load(os.path.join(CONFIGS, f"{name}.yaml")),
        }
    ).data
    assert cfg._target_ == f"segany.data.{cls.__name__}"
    dm = instantiate(cfg)
    assert str(tmp_path) in str(cfg.get("train_shards") or cfg.get("train_images") or cfg.get("root"))
    assert type(dm) is cls and dm.cfg.img_size == cfg.img_size and dm.cfg.max_masks == 64
    assert dm.cfg.max_area_frac == 0.9 and dm.batch_size == cfg.batch_size


class Probe(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen, self.faults = [], []

    def training_step(self, batch, batch_idx):
        assert "_data_state" not in batch
        self.seen.append(list(batch["image_id"]))
        self.faults.append(batch["faults"])
        return (self.w * batch["image"].mean()).sum() + (self.w * batch["masks"].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(dm, max_steps, root, ckpt=None):
    model = Probe()
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(root),
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
    return trainer, model


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_resume_continues_the_data(tmp_path):
    kw = dict(epoch_length=3, flip=True, seed=5)
    reference = fit(synthetic(tmp_path / "syn", **kw), 8, tmp_path)[1].seen
    trainer, first = fit(synthetic(tmp_path / "syn", **kw), 4, tmp_path)
    assert first.seen == reference[:4]
    trainer.save_checkpoint(str(tmp_path / "mid.ckpt"))
    ckpt = torch.load(str(tmp_path / "mid.ckpt"), weights_only=False)
    (loader_state,) = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]  # saved by Lightning
    assert worker_states(loader_state["ranks"][0]["loader"])[0]["samples"] == 8
    _, resumed = fit(synthetic(tmp_path / "syn", **kw), 8, tmp_path, ckpt=str(tmp_path / "mid.ckpt"))
    assert resumed.seen == reference[4:8]  # neither replayed nor skipped
    assert all(f == {} for f in first.faults)  # faults reach the module, per batch


def test_rank_comes_from_the_trainer(tmp_path):
    dm = synthetic(tmp_path / "syn")
    dm.prepare_data()
    dm.setup("fit")

    class FakeTrainer:
        global_rank, world_size = 1, 2

    dm.trainer = FakeTrainer()
    os.environ.pop("RANK", None)
    loader = dm.train_dataloader()
    assert (loader.dataset.rank, loader.dataset.world_size) == (1, 2)
    assert len(loader) == 12 // (2 * 2)


def _scene_masks(meta):
    return [mask_utils.decode(a["segmentation"]).astype(bool) for a in meta["annotations"]]


def test_thin_and_small_objects_at_the_configured_share():
    """The share of masks under 16 px wide (largest inscribed disc, an OpenCV distance
    transform) follows thin_small_frac; 1 px lines and 4-16 px blobs keep their masks."""
    widths = {}
    for frac in (0.0, 0.3):
        metas = [m for *_, m in scene_samples(40, seed=2, thin_small_frac=frac)]
        widths[frac] = np.array([mask_width(m) for meta in metas for m in _scene_masks(meta)])
    assert np.mean(widths[0.0] < 16) < 0.1  # large shapes: only occluded slivers are thin
    assert 0.22 <= np.mean(widths[0.3] < 16) <= 0.42  # configured default: ~32% measured on 350 scenes
    assert (widths[0.3] <= 1.5).any()  # 1 px lines survive min_visible


def test_line_and_blob_widths():
    for wd in (1, 3):
        line = _line(np.random.default_rng(wd), 120, 160, (wd, wd))
        assert mask_width(line) == pytest.approx(wd, abs=0.5) and line.sum() >= 10 * wd
    disc = _small(np.random.default_rng(0), 120, 160, (9.0, 9.0))
    assert disc.sum() == pytest.approx(np.pi * 4.5**2, rel=0.15) and 7 <= mask_width(disc) <= 9


def test_masks_are_exactly_the_painted_pixels():
    """Flat textures: every pixel of a mask has its object's colour, and no pixel next to the
    mask has it (a mask one pixel short or long along a 1 px line would fail)."""
    tol = 14  # per channel: pixel noise is N(0, 2)
    for seed in range(6):
        img, masks = make_scene(np.random.default_rng(seed), 96, 128, 8, textures=("flat",), thin_small_frac=0.6)
        img = img.astype(int)
        assert masks
        for m in masks:
            colour = np.median(img[m], 0)
            near = (np.abs(img - colour) <= tol).all(-1)
            assert near[m].all()
            ring = cv2.dilate(m.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & ~m
            assert not near[ring].any()


def test_scenes_depend_on_seed_and_image_id_only():
    a = list(scene_samples(4, seed=3, first_id=10, min_side=48, max_side=64))
    b = list(scene_samples(2, seed=3, first_id=12, min_side=48, max_side=64))
    assert a[2:] == b and a[0] != list(scene_samples(1, seed=4, first_id=10, min_side=48, max_side=64))[0]


def _shard_stamps(root):
    return {n: os.path.getmtime(os.path.join(root, n)) for n in os.listdir(root) if n.endswith(".tar")}


def test_old_or_other_data_is_generated_again(tmp_path, caplog):
    root = tmp_path / "syn"
    root.mkdir()
    (root / "train-000000.tar").write_bytes(b"old data, no manifest")
    with caplog.at_level(logging.INFO, logger="segany.data"):
        synthetic(root).prepare_data()
    assert "manifest.json" in caplog.text and "no " in caplog.text
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["spec"]["version"] == GENERATOR_VERSION and manifest["spec"]["thin_small_frac"] == 0.3
    assert (root / "train-000000.tar").read_bytes()[:21] != b"old data, no manifest"

    # a manifest of generator version 1 (the spec before thin / small objects)
    old = {k: manifest["spec"][k] for k in ("num_train", "num_val", "shard_size", "min_side", "max_side", "data_seed")}
    (root / "manifest.json").write_text(json.dumps(dict(manifest, spec=dict(old, version=1))))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="segany.data"):
        synthetic(root).prepare_data()
    assert f"version: 1 -> {GENERATOR_VERSION}" in caplog.text and "thin_small_frac: None -> 0.3" in caplog.text
    assert json.loads((root / "manifest.json").read_text()) == manifest  # same settings, same listing

    stamps = _shard_stamps(root)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="segany.data"):
        synthetic(root).prepare_data()  # matching: untouched, nothing logged
        assert _shard_stamps(root) == stamps and "generating" not in caplog.text
        synthetic(root, thin_small_frac=0.0).prepare_data()
    assert "thin_small_frac: 0.3 -> 0.0" in caplog.text
    assert json.loads((root / "manifest.json").read_text())["spec"]["thin_small_frac"] == 0.0
    a, b = (list(scene_samples(16, 0, 0, 40, 64, thin_small_frac=f)) for f in (0.0, 0.3))
    assert a != b  # the regenerated shards hold other scenes


def test_bad_generator_settings_are_named():
    with pytest.raises(ValueError, match="thin_small_frac"):
        SyntheticDataModule(thin_small_frac=1.5)
    with pytest.raises(ValueError, match="line_width"):
        SyntheticDataModule(line_width=[4, 1])
