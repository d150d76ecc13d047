"""The ablations of configs/experiment/ablations: each composes on its base recipe, every key it
claims to change (``ablation.changes``) and every arm of its sweep (``ablation.sweep``) reaches
the objects train.py builds (measured on the objects, not read back from the config), an
override that does nothing fails; a two-value multirun sweep trains end to end into two run
directories."""

import dataclasses
import os
import subprocess
import sys
from functools import cached_property, lru_cache
from pathlib import Path

import pytest
import torch
import yaml
from helpers import compose
from hydra.utils import instantiate
from omegaconf import OmegaConf

import segany.data
from segany.data.streams.shards import expand
from segany.training.config import check_train_config
from segany.training.prompting import MASK, POINT, initial_prompts, round_schedule

ROOT = Path(__file__).resolve().parents[1]
ABL_DIR = ROOT / "configs" / "experiment" / "ablations"
ABLATIONS = sorted(p.stem for p in ABL_DIR.glob("*.yaml"))

# the paper's per-size recipe (appendix A; B/L milestones scaled from ViT-H's): the truth the
# encoder-scale arms are checked against
PAPER = {
    "vit_b": dict(lr=8e-4, ld=0.6, dp=0.6, steps=180000, depth=12),
    "vit_l": dict(lr=4e-4, ld=0.8, dp=0.4, steps=180000, depth=24),
    "vit_h": dict(lr=8e-4, ld=0.8, dp=0.4, steps=90000, depth=32),
}
VARIANT_OF_DEPTH = {v["depth"]: k for k, v in PAPER.items()}


_compose = lru_cache(maxsize=None)(compose)  # once per override list (0.3 s each here); callers only read it


def _select(cfg, key):
    v = OmegaConf.select(cfg, key, throw_on_missing=True)
    return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v


def _cli(value) -> str:
    """a Python value as a Hydra command-line value"""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_cli(v) for v in value) + "]"
    return str(value)


class Built:
    """What train.py builds from a config, each part built on first use (models on meta)."""

    def __init__(self, cfg):
        self.cfg = cfg

    @cached_property
    def model(self):
        with torch.device("meta"):
            return instantiate(self.cfg.model, encoder_init=None, checkpoint=None)

    @cached_property
    def prompting(self):
        return instantiate(self.cfg.prompting)

    @cached_property
    def loss(self):
        return instantiate(self.cfg.loss)

    @cached_property
    def optim(self):
        return instantiate(self.cfg.optim)

    @cached_property
    def data(self):
        return instantiate(self.cfg.data, check_shards=False)

    @cached_property
    def trainer(self):
        return instantiate(
            self.cfg.trainer,
            accelerator="cpu",
            devices=1,
            num_nodes=1,
            strategy="auto",
            precision="32-true",
            logger=False,
            callbacks=[],
            enable_progress_bar=False,
            enable_checkpointing=False,
            default_root_dir="/nonexistent",
        )


def _round0(p, text: bool):
    """round-0 prompts of 4000 rows, a 16 x 16 square mask each (text: all with a CLIP embedding)"""
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(4000, 32, 32, dtype=torch.bool)
    masks[:, 8:24, 8:24] = True
    boxes = torch.tensor([8.0, 8.0, 23.0, 23.0]).expand(4000, 4)
    size = torch.tensor([[32, 32]]).expand(4000, 2)
    yes = torch.ones(4000, dtype=torch.bool)
    return initial_prompts(masks, boxes, yes, size, p, g, *((torch.zeros(4000, 8), yes) if text else ()))


def _box_fraction(p) -> float:
    """fraction of the rows whose first prompt is a box"""
    return float(_round0(p, text=False).is_box.float().mean())


def _text_fraction(p) -> float:
    """fraction of the rows, all with a CLIP embedding, whose first prompt is the text token"""
    pr = _round0(p, text=True)
    return 0.0 if pr.is_text is None else float(pr.is_text.float().mean())


def _box_noise(p) -> float:
    """measured std of the first-prompt box corners / the box side (side 100: under the 20 px cap at 0.1)"""
    p = dataclasses.replace(p, p_box=1.0)
    g = torch.Generator().manual_seed(0)
    n, s = 400, 192
    boxes = torch.tensor([40.0, 40.0, 140.0, 140.0]).expand(n, 4)
    size = torch.tensor([[s, s]]).expand(n, 2)
    pr = initial_prompts(torch.ones(n, s, s, dtype=torch.bool), boxes, torch.ones(n, dtype=torch.bool), size, p, g)
    return round(float((pr.box - boxes).std()) / 100.0, 2)


def _iou_loss_kind(loss) -> str:
    """perfect mask logits (true IoU 1), predicted IoU 0.3: the IoU term is 0.49 (MSE) or 0.7 (L1)"""
    target = torch.zeros(1, 8, 8, dtype=torch.bool)
    target[:, 2:6, 2:6] = True
    logits = torch.where(target, 20.0, -20.0)[:, None]
    out = loss(logits, torch.full((1, 1), 0.3), target, torch.ones(1, dtype=torch.bool))
    term = float(out["iou"][0])
    return {0.49: "mse", 0.7: "l1"}[round(term, 2)]


def _target_side(p) -> str:
    """the loss-target side the simulation uses for a 64 px batch: 64 (full) or 16 (low)"""
    from segany.training.simulation import loss_targets

    side = loss_targets({"masks": torch.zeros(1, 1, 64, 64, dtype=torch.bool)}, p.resolution).shape[-1]
    return {64: "full", 16: "low"}[side]


def _iou_supervised(loss) -> bool:
    """True when all 3 multimask IoU predictions get a gradient, False when only the chosen one"""
    iou_pred = torch.rand(1, 3, requires_grad=True)
    target = torch.zeros(1, 8, 8, dtype=torch.bool)
    target[:, 2:6, 2:6] = True
    loss(torch.randn(1, 3, 8, 8), iou_pred, target, torch.ones(1, dtype=torch.bool))["loss"].sum().backward()
    return {3: True, 1: False}[int((iou_pred.grad != 0).sum())]


def _num_train_shards(b: Built) -> int:
    dm = b.data
    return len(dm._stream(dm.train_shards, True, "train_shards").urls)


def observed(b: Built, key: str):
    """The value of config key `key` as the built objects show it."""
    parts = key.split(".")
    if key == "model":
        return VARIANT_OF_DEPTH[len(b.model.image_encoder.blocks)]
    if key == "model.decoder_depth":
        return len(b.model.mask_decoder.transformer.layers)
    if key == "prompting.point_rounds":
        return round_schedule(b.prompting).count(POINT)
    if key == "prompting.mask_rounds":
        return round_schedule(b.prompting).count(MASK)
    if key == "prompting.p_box":
        return round(_box_fraction(b.prompting), 1)
    if key == "prompting.box_noise_frac":
        return _box_noise(b.prompting)
    if key == "prompting.p_text":
        return round(_text_fraction(b.prompting), 1)
    if key == "model.text_embed_dim":
        return b.model.prompt_encoder.text_embed_dim
    if key == "data.clip_sidecar":
        return b.data.clip_sidecar
    if key == "prompting.multimask":
        return b.prompting.multimask
    if key == "prompting.detach_feedback":
        return b.prompting.detach_feedback
    if key == "prompting.resolution":
        return _target_side(b.prompting)
    if key == "loss.supervise_all_iou":
        return _iou_supervised(b.loss)
    if key == "loss.iou_loss":
        return _iou_loss_kind(b.loss)
    if key in ("loss.focal_weight", "loss.dice_weight"):
        return getattr(b.loss, parts[1])
    if key == "optim.milestones":  # fractions of max_steps -> the built schedule's steps
        b.optim.schedule.set_max_steps(b.trainer.max_steps)
        return b.optim.schedule.milestones
    if key == "trainer.max_steps":
        return b.trainer.max_steps
    if key == "data._target_":
        cls = type(b.data)
        assert getattr(segany.data, cls.__name__) is cls
        return f"segany.data.{cls.__name__}"
    if key == "data.jitter":
        return b.data.cfg.jitter is not None
    if key == "data.train_num_shards":
        return _num_train_shards(b)
    if key == "data.weighting":
        return b.data.weighting
    if key == "data.use":  # the sources the stream will draw from
        return list(b.data.probabilities)
    if len(parts) == 4 and parts[:2] == ["data", "sources"] and parts[3] == "weight":
        return b.data.sources[parts[2]].weight
    raise AssertionError(f"tests/test_ablations.py: no way to observe {key!r} on the built objects; add one")


def expected(cfg, key: str, value):
    """what observed() must show for config value `value`"""
    if key == "data.train_num_shards" and value is None:
        return len(expand(_select(cfg, "data.train_shards")))
    if key == "data.use" and value is None:
        return list(_select(cfg, "data.sources"))
    return value


def meta(name: str) -> dict:
    return _select(_compose(f"experiment=ablations/{name}"), "ablation")


def test_every_ablation_says_what_it_reproduces_and_is_documented():
    assert {
        "data_engine",
        "data_volume",
        "encoder_scale",
        "interactive_points",
        "first_prompt",
        "multimask",
        "loss_weights",
        "iou_loss",
        "lsj",
        "amg_model",
    } <= set(ABLATIONS)
    doc = (ROOT / "experiments" / "ablations.md").read_text()
    for name in ABLATIONS:
        text = (ABL_DIR / f"{name}.yaml").read_text()
        assert text.startswith("# @package _global_\n"), name
        for word in ("Reproduces:", "Paper found:", "Base:"):
            assert word in text, f"{name}.yaml: no '{word}' comment"
        m = meta(name)
        assert set(m) >= {"reproduces", "paper_found", "base", "changes"}, name
        assert m["changes"] or m.get("sweep"), f"{name}: changes nothing and sweeps nothing"
        defaults = yaml.safe_load(text)["defaults"]
        assert f"/experiment/{m['base']}" in defaults, f"{name}: base {m['base']} not in its defaults"
        assert f"experiment=ablations/{name}" in doc, f"experiments/ablations.md: no command for {name}"


@pytest.mark.parametrize("name", ABLATIONS)
def test_changes_reach_the_built_objects(name):
    cfg = _compose(f"experiment=ablations/{name}")
    check_train_config(cfg)
    assert cfg.name == f"ablations/{name}"
    m = _select(cfg, "ablation")
    base = _compose(f"experiment={m['base']}")
    built, built_base = Built(cfg), Built(base)
    for key, value in m["changes"].items():
        assert _select(cfg, key) == value, f"{name}: {key} is {_select(cfg, key)!r}, the file claims {value!r}"
        before = OmegaConf.select(base, key, default=None)
        before = OmegaConf.to_container(before) if OmegaConf.is_config(before) else before
        assert before != value, f"{name}: {key}={value!r} is already the base's value"
        got = observed(built, key)
        assert got == expected(cfg, key, value), f"{name}: {key}={value!r} but the built objects show {got!r}"
        if before is not None:
            assert observed(built_base, key) != got, f"{name}: {key} changes nothing on the built objects"


SWEEPS = [(name, key) for name in ABLATIONS for key in (meta(name).get("sweep") or {})]


@pytest.mark.parametrize("name,key", SWEEPS, ids=[f"{n}-{k}" for n, k in SWEEPS])
def test_sweep_arms_reach_the_built_objects(name, key):
    values = meta(name)["sweep"][key]
    assert len(values) >= 2
    seen = []
    for value in values:
        cfg = _compose(f"experiment=ablations/{name}", f"{key}={_cli(value)}")
        check_train_config(cfg)
        got = observed(Built(cfg), key)
        assert got == expected(cfg, key, value), f"{name}: {key}={value!r} but the built objects show {got!r}"
        seen.append(repr(got))
    assert len(set(seen)) == len(values), f"{name}: the arms of {key} build the same objects: {seen}"


@pytest.mark.parametrize("variant", sorted(PAPER))
def test_encoder_scale_arms_follow_each_sizes_recipe(variant):
    cfg = _compose("experiment=ablations/encoder_scale", f"model={variant}")
    b, paper = Built(cfg), PAPER[variant]
    assert len(b.model.image_encoder.blocks) == paper["depth"]
    assert b.optim.lr == paper["lr"] and b.optim.layer_decay == paper["ld"]
    assert b.trainer.max_steps == paper["steps"]
    assert b.model.image_encoder.blocks[-1].drop_path1.drop_prob == pytest.approx(paper["dp"])
    assert cfg.model.encoder_init.endswith({"vit_b": "base", "vit_l": "large", "vit_h": "huge"}[variant] + ".pth")


def test_data_engine_mixture_oversamples_manual_and_semi_10x():
    b = Built(_compose("experiment=ablations/data_engine"))
    p = b.data.probabilities
    # per image: manual / semi images are drawn 10x as often as automatic ones
    per_image = {s: p[s] / n for s, n in (("manual", 120000), ("semi", 180000), ("automatic", 11000000))}
    assert per_image["manual"] == pytest.approx(10 * per_image["automatic"])
    assert per_image["semi"] == pytest.approx(10 * per_image["automatic"])
    assert sum(p.values()) == pytest.approx(1.0)


def test_launcher_configs_compose():
    for name, target in (("slurm_local", "LocalLauncher"), ("slurm", "SlurmLauncher")):
        cfg = compose("experiment=ablations/multimask", f"hydra/launcher={name}", return_hydra_config=True)
        launcher = cfg.hydra.launcher
        assert launcher._target_ == f"hydra_plugins.hydra_submitit_launcher.submitit_launcher.{target}"
        assert launcher.submitit_folder.startswith(cfg.hydra.sweep.dir + "/")
    # SLURM: one task per GPU, as Lightning expects (the trainer follows the allocation)
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (1, 8, 8)


TINY = """# @package _global_
defaults:
  - override /model: vit_tiny
  - override /data: synthetic
  - override /trainer: cpu
  - override /logger: csv
model: {{encoder_init: null, drop_path_rate: 0.0, embed_dim: 64, depth: 2, num_heads: 2, global_attn_indexes: [1],
         decoder_mlp_dim: 256}}
data: {{root: {root}/synthetic, num_train: 4, num_val: 2, shard_size: 2, batch_size: 1, max_masks: 2, num_workers: 0}}
prompting: {{mask_rounds: 1, checkpoint_rounds: false}}
optim: {{warmup_iters: 0}}
global_batch: null
trainer: {{max_steps: 2, devices: 1, num_nodes: 1, precision: 32-true, limit_val_batches: 0,
          enable_progress_bar: false}}
callbacks: {{progress_bar: null}}
"""


def test_multirun_sweep_trains_two_runs_in_their_own_directories(tmp_path):
    (tmp_path / "cfg" / "local").mkdir(parents=True)
    (tmp_path / "cfg" / "local" / "tiny.yaml").write_text(TINY.format(root=tmp_path))
    env = dict(os.environ, WANDB_MODE="offline", SEGANY_RUNS=str(tmp_path / "runs"), HYDRA_FULL_ERROR="1")
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        "experiment=ablations/interactive_points",
        "+local=tiny",
        f"hydra.searchpath=[file://{tmp_path / 'cfg'}]",
        "prompting.point_rounds=1,2",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sweep = tmp_path / "runs" / "ablations" / "interactive_points_sweep"
    runs = sorted(p.parent.parent for p in sweep.glob("*/checkpoints/last.ckpt"))
    assert [r.name for r in runs] == ["+local=tiny,prompting.point_rounds=1", "+local=tiny,prompting.point_rounds=2"]
    for run, rounds in zip(runs, (1, 2)):
        saved = OmegaConf.load(run / "config.yaml")
        assert saved.prompting.point_rounds == rounds and saved.paths.run_dir == str(run)
        ck = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert ck["global_step"] == 2 and ck["segany_config"]["prompting"]["point_rounds"] == rounds
        assert (run / "hydra" / "overrides.yaml").is_file()  # Hydra's own record, same directory
