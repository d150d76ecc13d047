"""Every experiment composes (with every strategy); the big models instantiate on the meta
device; the lr schedules are the paper's; the small recipes fit 2 steps on CPU."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import compose
from hydra.utils import instantiate
from omegaconf import OmegaConf

from segany.training.config import check_train_config
from segany.training.sharding import ShardingConfig

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))
ABLATIONS = sorted("ablations/" + p.stem for p in (ROOT / "configs" / "experiment" / "ablations").glob("*.yaml"))


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
    for part in ("model", "prompting", "loss", "optim"):  # the module nests the top-level parts
        assert cfg.module[part] == cfg[part], part
    instantiate(cfg.prompting), instantiate(cfg.loss), instantiate(cfg.optim)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "default"])
@pytest.mark.parametrize("name", EXPERIMENTS + ABLATIONS)
def test_every_strategy_composes_with_every_recipe(name, strategy):
    cfg = compose(f"experiment={name}", f"strategy={strategy}")
    check_train_config(cfg)
    target = OmegaConf.select(cfg, "trainer.strategy._target_", default=cfg.trainer.strategy)
    assert (
        target.rsplit(".", 1)[-1]
        == {
            "ddp": "DDPStrategy",
            "fsdp": "AtomicModelParallelStrategy",
            "default": "auto",
        }[strategy]
    )
    if strategy == "fsdp":
        assert isinstance(instantiate(cfg.module.sharding), ShardingConfig)
    else:
        assert cfg.module.sharding is None


PAPER = {  # lr, steps, milestone steps, drop path, layer decay, global batch, variant
    "vit_h_sa1b": (8e-4, 90000, [60000, 86666], 0.4, 0.8, 256, "vit_h"),
    "vit_l_sa1b": (4e-4, 180000, [120000, 173333], 0.4, 0.8, 128, "vit_l"),
    "vit_b_sa1b": (8e-4, 180000, [120000, 173333], 0.6, 0.6, 128, "vit_b"),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_numbers(name):
    lr, steps, milestones, dp, ld, batch, variant = PAPER[name]
    cfg = compose(f"experiment={name}")
    assert cfg.model.variant == variant
    optim = instantiate(cfg.optim)
    optim.schedule.set_max_steps(cfg.trainer.max_steps)
    assert cfg.optim.lr == lr and cfg.trainer.max_steps == steps and optim.schedule.milestones == milestones
    assert cfg.optim.gamma == 0.1 and cfg.optim.warmup_iters == 250 and cfg.optim.weight_decay == 0.1
    assert list(cfg.optim.betas) == [0.9, 0.999]
    assert cfg.model.drop_path_rate == dp and cfg.optim.layer_decay == ld and cfg.model.decoder_dropout == 0.1
    assert cfg.global_batch == batch
    import train

    # the paper's layout (1 image on each of `batch` GPUs): no accumulation; 8 GPUs accumulate
    for world, acc in ((batch, 1), (8, batch // 8)):
        trainer = SimpleNamespace(world_size=world, accumulate_grad_batches=1)
        train.apply_global_batch(cfg, trainer)
        assert trainer.accumulate_grad_batches == acc
    assert cfg.data.max_masks == 64
    p = instantiate(cfg.prompting)
    assert p.num_rounds == 11 and p.p_box == 0.5


@pytest.mark.parametrize("name", ["vit_h_sa1b", "vit_l_sa1b"])
def test_big_models_instantiate_on_meta(name):
    import pytorch_lightning as pl

    cfg = compose(f"experiment={name}", "model.encoder_init=null", "model.checkpoint=null")
    with torch.device("meta"):
        module = instantiate(cfg.module, _convert_="all")  # as train.py builds it
    model = module.model
    n = sum(p.numel() for p in model.parameters())
    assert n == pytest.approx({"vit_h_sa1b": 641e6, "vit_l_sa1b": 312e6}[name], rel=0.01)
    module.trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=cfg.trainer.max_steps, logger=False, enable_checkpointing=False
    )
    opt = module.configure_optimizers()["optimizer"]
    depth = len(model.image_encoder.blocks)
    lrs = sorted({g["initial_lr"] for g in opt.param_groups})
    assert lrs[0] == pytest.approx(cfg.optim.lr * cfg.optim.layer_decay ** (depth + 1))
    assert lrs[-1] == pytest.approx(cfg.optim.lr) and len(lrs) == depth + 2


def _paper_lr(step, milestones, warmup=250):
    """the paper's schedule at absolute steps (appendix A): linear warmup, lr / 10 at each milestone. The
    warmup's start is not stated; ours is 1 / warmup (step 0 already updates), reaching 1 at step warmup"""
    start = 1 / warmup
    return min(1.0, start + (1 - start) * step / warmup) * 0.1 ** sum(step >= m for m in milestones)


@pytest.mark.parametrize(
    "name,max_steps,milestones",
    [
        ("vit_h_sa1b", 90000, [60000, 86666]),
        ("vit_l_sa1b", 180000, [120000, 173333]),
        ("vit_b_sa1b", 180000, [120000, 173333]),
        ("ablations/amg_model", 177656, [118437, 171076]),  # the file's own numbers before they became fractions
    ],
)
def test_fractional_milestones_give_the_absolute_step_schedule(name, max_steps, milestones):
    cfg = compose(f"experiment={name}")
    assert cfg.trainer.max_steps == max_steps
    s = instantiate(cfg.optim).schedule
    s.set_max_steps(cfg.trainer.max_steps)
    steps = [0, 1, 125, 249, 250, 251, 1000]
    steps += [m + d for m in milestones for d in (-1, 0, 1)] + [max_steps - 1, max_steps]
    assert [s(t) for t in steps] == pytest.approx([_paper_lr(t, milestones) for t in steps], rel=1e-12)


def test_demo_schedule_is_the_planned_cooldown_at_any_length():
    # warmup 20 from 1/20, no step, lr -> 0 linearly over steps 420..1400 of the 1400-step plan
    cfg = compose()
    s = instantiate(cfg.optim).schedule
    s.set_max_steps(cfg.trainer.max_steps)

    def old(t):
        return min(1.0, 0.05 + 0.95 * t / 20) * (1 - min(1.0, max(0, t - 420) / 980))

    steps = [0, 10, 20, 21, 419, 420, 421, 700, 910, 1399, 1400]
    assert cfg.trainer.max_steps == 1400 and [s(t) for t in steps] == pytest.approx([old(t) for t in steps])
    s.set_max_steps(1000)  # a time budget: the same shape over 1000 steps (ramp 300..1000)
    assert s.cooldown == [300, 1000] and s(650) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="trainer.max_steps"):  # fractions need a run length
        s.set_max_steps(-1)


def test_slurm_job_id_names_the_run_dir(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert compose("experiment=vit_b_sa1b").paths.run_dir.endswith("vit_b_sa1b_4242")
    monkeypatch.delenv("SLURM_JOB_ID")
    assert compose("experiment=vit_b_sa1b").paths.run_dir.endswith("vit_b_sa1b")


def test_data_img_size_must_be_the_models():
    """data.img_size is checked against the model that was built (train.build runs
    follow_model_size before it builds the data); null follows the model."""
    import train

    cfg = compose("data.img_size=null")
    model = instantiate(cfg.module.model)
    size = model.image_encoder.img_size
    train.follow_model_size(cfg, model)
    assert cfg.data.img_size == size
    cfg = compose(f"data.img_size={2 * size}")
    msg = rf"data.img_size={2 * size} but the model's input size is {size} \(model.checkpoint=None\)"
    with pytest.raises(ValueError, match=msg):
        train.follow_model_size(cfg, model)


def test_config_errors_name_the_key():
    from hydra.errors import InstantiationException
    from omegaconf import open_dict

    cfg = compose()
    with open_dict(cfg):
        cfg.prompting.resolution = "half"
    check_train_config(cfg)  # a node's own values: checked by its dataclass, where it is built
    with pytest.raises(InstantiationException, match="prompting.resolution='half'"):
        instantiate(cfg.prompting)
    with pytest.raises(ValueError, match="optim.fused"):  # the demo's fused AdamW under bf16 + clipping
        check_train_config(compose("precision=bf16"))
    check_train_config(compose("precision=bf16", "optim.fused=false"))
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
