"""Every experiment composes; the big models instantiate on the meta device; the small
recipes fit 2 steps on CPU."""

from pathlib import Path

import pytest
import torch
from helpers import compose
from hydra.utils import instantiate

from segany.training.config import check_train_config

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))


def test_the_paper_recipes_are_there():
    assert {"demo", "vit_h_sa1b", "vit_l_sa1b", "vit_b_sa1b", "finetune_coco"} <= set(EXPERIMENTS)
    for name in EXPERIMENTS:
        assert (ROOT / "experiments" / f"{name}.md").is_file(), f"experiments/{name}.md missing"


def test_no_arguments_is_the_demo():
    cfg = compose()
    assert cfg.name == "demo" and cfg.model.variant == "vit_tiny"
    assert cfg.data._target_.endswith("SyntheticDataModule") and cfg.trainer.accelerator == "cpu"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_every_node_has_a_target(name):
    cfg = compose(f"experiment={name}")
    check_train_config(cfg)
    assert cfg.name == name
    for node in ("model", "data", "trainer", "optim", "prompting", "loss", "module", "logger"):
        assert "_target_" in cfg[node], node
    instantiate(cfg.prompting), instantiate(cfg.loss), instantiate(cfg.optim)


PAPER = {  # lr, steps, milestones, drop path, layer decay, global batch, variant
    "vit_h_sa1b": (8e-4, 90000, [60000, 86666], 0.4, 0.8, 256, "vit_h"),
    "vit_l_sa1b": (4e-4, 180000, [120000, 173333], 0.4, 0.8, 128, "vit_l"),
    "vit_b_sa1b": (8e-4, 180000, [120000, 173333], 0.6, 0.6, 128, "vit_b"),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_numbers(name):
    lr, steps, milestones, dp, ld, batch, variant = PAPER[name]
    cfg = compose(f"experiment={name}")
    assert cfg.model.variant == variant
    assert cfg.optim.lr == lr and cfg.trainer.max_steps == steps and list(cfg.optim.milestones) == milestones
    assert cfg.optim.gamma == 0.1 and cfg.optim.warmup_iters == 250 and cfg.optim.weight_decay == 0.1
    assert list(cfg.optim.betas) == [0.9, 0.999]
    assert cfg.model.drop_path_rate == dp and cfg.optim.layer_decay == ld and cfg.model.decoder_dropout == 0.1
    assert cfg.global_batch == batch
    assert (
        cfg.trainer.devices * cfg.trainer.num_nodes * cfg.data.batch_size == batch
    )  # the paper's layout: no accumulation
    assert cfg.data.max_masks == 64
    p = instantiate(cfg.prompting)
    assert p.num_rounds == 11 and p.p_box == 0.5


@pytest.mark.parametrize("name", ["vit_h_sa1b", "vit_l_sa1b"])
def test_big_models_instantiate_on_meta(name):
    cfg = compose(f"experiment={name}")
    with torch.device("meta"):
        model = instantiate(cfg.model, encoder_init=None, checkpoint=None)
    n = sum(p.numel() for p in model.parameters())
    assert n == pytest.approx({"vit_h_sa1b": 641e6, "vit_l_sa1b": 312e6}[name], rel=0.01)
    module = instantiate(cfg.module, _partial_=True)(
        model=model, prompting=instantiate(cfg.prompting), loss=instantiate(cfg.loss), optim=instantiate(cfg.optim)
    )
    opt = module.configure_optimizers()["optimizer"]
    depth = len(model.image_encoder.blocks)
    lrs = sorted({g["initial_lr"] for g in opt.param_groups})
    assert lrs[0] == pytest.approx(cfg.optim.lr * cfg.optim.layer_decay ** (depth + 1))
    assert lrs[-1] == pytest.approx(cfg.optim.lr) and len(lrs) == depth + 2


def test_slurm_job_id_names_the_run_dir(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert compose("experiment=vit_b_sa1b").paths.run_dir.endswith("vit_b_sa1b_4242")
    monkeypatch.delenv("SLURM_JOB_ID")
    assert compose("experiment=vit_b_sa1b").paths.run_dir.endswith("vit_b_sa1b")


def test_config_errors_name_the_key():
    from omegaconf import open_dict

    cfg = compose()
    with open_dict(cfg):
        cfg.prompting.resolution = "half"
    with pytest.raises(ValueError, match="prompting.resolution"):
        check_train_config(cfg)
    with pytest.raises(ValueError, match="optim.fused"):  # the demo's fused AdamW under bf16-mixed + clipping
        check_train_config(compose("trainer.precision=bf16-mixed"))
    with pytest.raises(ValueError, match="optim.fused"):  # "bf16" is Lightning's alias of bf16-mixed
        check_train_config(compose("trainer.precision=bf16"))
    check_train_config(compose("trainer.precision=bf16-mixed", "optim.fused=false"))
    from hydra.errors import InstantiationException

    with pytest.raises(InstantiationException, match="optim.layer_decay"):
        instantiate(compose("optim.layer_decay=1.5").optim)


def _fit(tmp_path, *overrides):
    import train

    cfg = compose(
        "logger=csv",
        f"paths.root_dir={tmp_path}",
        "trainer.max_steps=2",
        "trainer.limit_val_batches=1",
        "trainer.check_val_every_n_epoch=1",
        "data.num_workers=0",
        f"data.root={tmp_path}/synthetic",
        "data.num_train=8",
        "data.num_val=4",
        "data.shard_size=4",
        "data.batch_size=2",
        "data.max_masks=3",
        "prompting.point_rounds=1",
        "prompting.mask_rounds=1",
        "trainer.enable_progress_bar=false",
        "~callbacks.progress_bar",
        *overrides,
    )
    return cfg, train.train(cfg)


def test_demo_fits_two_steps_and_resumes(tmp_path):
    cfg, metrics = _fit(tmp_path)
    run = Path(cfg.paths.run_dir)
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    ck = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ck["global_step"] == 2 and ck["segany_config"]["name"] == "demo"
    _fit(tmp_path, "trainer.max_steps=3")  # same run dir: continues from last.ckpt
    ck = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ck["global_step"] == 3


def test_finetune_recipe_fits_two_steps_with_a_frozen_encoder(tmp_path):
    import pytorch_lightning as pl

    cfg, _ = _fit(
        tmp_path,
        "experiment=finetune_coco",
        "model=vit_tiny",
        "model.checkpoint=null",
        "data=synthetic",
        "trainer=cpu",
        "trainer.max_steps=2",
        "optim.warmup_iters=0",
    )
    ck = torch.load(Path(cfg.paths.run_dir) / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    pl.seed_everything(cfg.seed)
    init = instantiate(cfg.model)  # train.py's init: same seed, same weights
    sd = ck["state_dict"]
    params = dict(init.named_parameters())
    enc = [torch.equal(sd["model." + k], v) for k, v in params.items() if k.startswith("image_encoder.")]
    rest = [torch.equal(sd["model." + k], v) for k, v in params.items() if not k.startswith("image_encoder.")]
    assert all(enc) and sum(rest) < 0.1 * len(rest)  # encoder untouched, the rest trained
    n_opt = sum(len(g["params"]) for g in ck["optimizer_states"][0]["param_groups"])
    assert n_opt == len(list(init.parameters())) - len(list(init.image_encoder.parameters()))
