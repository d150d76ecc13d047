"""Synthetic shards, Hydra configs, and the datamodule inside a real Lightning fit/resume."""

import os

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from segany.data import CocoDataModule, SA1BDataModule, SyntheticDataModule
from segany.data.make_shards import main as make_shards
from segany.data.scenes import scene_samples
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
        assert all(a["area"] >= 24 for a in anns)


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
