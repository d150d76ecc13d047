"""The non-finite guard (segany/training/nonfinite.py) in tiny CPU fits with a NaN planted at a
known step: a skipped step is exactly a step whose update was not applied, is logged with the
batch's image ids and counted (on through a resume); max_consecutive skips in a row stop the run
and leave the last good last.ckpt; the save path refuses non-finite weights; under 2-process
DDP a NaN loss on rank 1 alone is skipped on both ranks."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers import compose

import segany
from segany.modeling.checkpoint.read import LIGHTNING_META
from segany.training.checkpointing import AtomicCheckpointIO
from segany.training.nonfinite import NonFiniteError, NonFiniteGuard

ROOT = Path(__file__).resolve().parents[1]
PLANT = "tests.test_nonfinite.PlantNaN"


class PlantNaN(pl.Callback):
    """At the global steps `steps` (micro-batch `micro` of each; on `ranks`, all if None) plants a
    NaN: where="image" puts an inf in the first image (loss and gradients NaN), where="loss" adds
    NaN to the loss (gradients stay finite). apply=false: the plain model's optimiser skips those
    steps itself (no step at all: the reference). Writes <dump>/rank<r>.json (the planted image
    ids) and, at the end of training, <dump>/rank<r>.pt (weights, AdamW's step counts)."""

    def __init__(self, dump, steps=(), ranks=None, where="image", micro=0, apply=True):
        self.dump, self.steps, self.ranks, self.where = Path(dump), set(steps), ranks, where
        self.micro, self.apply, self.planted = int(micro), bool(apply), []

    def _hit(self, trainer, batch_idx):
        on_rank = self.ranks is None or trainer.global_rank in self.ranks
        micro = batch_idx % trainer.accumulate_grad_batches == self.micro
        return on_rank and micro and trainer.global_step in self.steps

    def setup(self, trainer, pl_module, stage):
        step_fn, opt_step = pl_module.training_step, pl_module.optimizer_step

        def training_step(batch, batch_idx):
            hit = self._hit(trainer, batch_idx)
            if hit and self.where == "image":
                batch["image"][0, 0, 0, 0] = float("inf")
            loss = step_fn(batch, batch_idx)
            if hit:
                loss = loss + float("nan") if self.where == "loss" else loss
                self.planted.append([trainer.global_step, list(batch["image_id"])])
                self.dump.mkdir(parents=True, exist_ok=True)
                (self.dump / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.planted))
            return loss

        def optimizer_step(epoch, batch_idx, optimizer, optimizer_closure=None):
            if self.apply or trainer.global_step not in self.steps:
                return opt_step(epoch, batch_idx, optimizer, optimizer_closure)
            optimizer_closure()  # forward + backward, no update

        pl_module.training_step, pl_module.optimizer_step = training_step, optimizer_step

    def on_train_end(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        steps = sorted({int(s["step"]) for s in opt.state.values()})
        self.dump.mkdir(parents=True, exist_ok=True)
        # FSDP: every rank gathers the full weights (a collective, in the same order on all ranks)
        weights = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in pl_module.state_dict().items()}
        torch.save({"weights": weights, "steps": steps}, self.dump / f"rank{trainer.global_rank}.pt")


def _plant(dump, steps, **kw):
    out = [f"+callbacks.plant._target_={PLANT}", f"+callbacks.plant.dump={dump}", f"+callbacks.plant.steps={steps}"]
    return out + [f"+callbacks.plant.{k}={v}" for k, v in kw.items()]


def _fit(root, *overrides):
    import train

    cfg = compose(
        "logger=csv",
        f"paths.root_dir={root}",
        "trainer.limit_val_batches=0",
        "trainer.log_every_n_steps=1",
        "data.num_workers=0",
        f"data.root={root.parent}/synthetic",
        "data.num_train=8",
        "data.num_val=2",
        "data.shard_size=4",
        "data.batch_size=2",
        "data.max_masks=2",
        "prompting.point_rounds=1",
        "prompting.mask_rounds=0",
        "trainer.enable_progress_bar=false",
        "~callbacks.progress_bar",
        *overrides,
    )
    train.train(cfg)
    return Path(cfg.paths.run_dir)


def _ckpt(run):
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def _adam_steps(ck):
    return sorted({int(s["step"]) for s in ck["optimizer_states"][0]["state"].values()})


def test_skipped_step_equals_a_step_not_applied_and_the_count_resumes(tmp_path, caplog):
    """A NaN image at step 2 of 4: the weights equal those of a run whose step 2 was never applied
    (same data, same seeds); AdamW took 3 steps; the skip is logged with the batch's image ids and
    counted; a resumed run with one more NaN step counts 2."""
    caplog.set_level(logging.WARNING, logger="segany.training.nonfinite")
    guarded = _fit(tmp_path / "a", "trainer.max_steps=4", *_plant(tmp_path / "plant_a", [2]))
    reference = _fit(
        tmp_path / "b",
        "trainer.max_steps=4",
        "module.nonfinite.enabled=false",
        *_plant(tmp_path / "plant_b", [2], apply=False),
    )
    ck, ref = _ckpt(guarded), _ckpt(reference)
    for k, v in ref["state_dict"].items():
        assert torch.isfinite(ck["state_dict"][k]).all(), k
        assert torch.equal(ck["state_dict"][k], v), k
    assert ck["global_step"] == 4 and _adam_steps(ck) == [3] == _adam_steps(ref)
    assert ck["segany_nonfinite"] == {"skipped": 1, "consecutive": 0}
    ((step, ids),) = json.loads((tmp_path / "plant_a" / "rank0.json").read_text())
    msg = [r.getMessage() for r in caplog.records if "skipped (no update)" in r.getMessage()]
    assert step == 2 and len(msg) == 1 and msg[0].startswith("step 2 skipped") and str(ids) in msg[0], msg
    assert "loss not finite on rank(s) [0]" in msg[0] and "gradient norm nan" in msg[0]
    logged = (guarded / "logs" / "metrics.csv").read_text().splitlines()
    col = logged[0].split(",").index("train/skipped_nonfinite")
    assert [float(r.split(",")[col]) for r in logged[1:] if r.split(",")[col]][-1] == 1.0

    resumed = _fit(tmp_path / "a", "trainer.max_steps=6", *_plant(tmp_path / "plant_a2", [4]))
    ck = _ckpt(resumed)
    assert ck["global_step"] == 6 and ck["segany_nonfinite"] == {"skipped": 2, "consecutive": 0}
    assert _adam_steps(ck) == [4]


def test_a_nan_loss_in_any_accumulated_micro_batch_skips_the_step(tmp_path):
    """accumulate_grad_batches=2, a NaN added to the loss of micro-batch 0 of step 1 (gradients
    finite): the step is still skipped."""
    run = _fit(
        tmp_path / "a",
        "trainer.max_steps=3",
        "trainer.accumulate_grad_batches=2",
        "data.batch_size=1",
        *_plant(tmp_path / "plant", [1], where="loss", micro=0),
    )
    ck = _ckpt(run)
    assert ck["global_step"] == 3 and _adam_steps(ck) == [2] and ck["segany_nonfinite"]["skipped"] == 1
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values() if v.is_floating_point())


def test_consecutive_skips_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path):
    """Checkpoints every 2 steps; NaN images from step 1 on: the 3rd skip in a row (step 3, whose
    end would write step0000004.ckpt and last.ckpt) stops the run naming the step and what was not
    finite; last.ckpt is still step 2's (step 0's weights: step 1 was skipped), loadable."""
    ckdir = tmp_path / "a" / "demo" / "checkpoints"
    with pytest.raises(NonFiniteError) as e:
        _fit(
            tmp_path / "a",
            "trainer.max_steps=8",
            "callbacks.checkpoint.every_n_train_steps=2",
            *_plant(tmp_path / "plant", [1, 2, 3, 4, 5]),
        )
    msg = str(e.value)
    assert "stopping at step 3: 3 steps in a row skipped (max_consecutive=3)" in msg, msg
    assert "loss not finite on rank(s) [0]" in msg and "gradient norm nan" in msg
    planted = json.loads((tmp_path / "plant" / "rank0.json").read_text())
    assert [s for s, _ in planted] == [1, 2, 3] and str(planted[-1][1]) in msg
    assert sorted(p.name for p in ckdir.glob("*.ckpt")) == ["last.ckpt", "step0000002.ckpt"]
    ck, saved = _ckpt(tmp_path / "a" / "demo"), torch.load(ckdir / "step0000002.ckpt", weights_only=True)
    assert ck["global_step"] == 2 and ck["segany_nonfinite"] == {"skipped": 1, "consecutive": 1}
    assert all(torch.isfinite(v).all() and torch.equal(v, saved["state_dict"][k]) for k, v in ck["state_dict"].items())
    assert _adam_steps(ck) == [1]
    model = segany.build_sam(checkpoint=str(ckdir / "last.ckpt"))  # loadable (and verified) as any checkpoint
    assert torch.equal(model.mask_decoder.iou_token.weight, ck["state_dict"]["model.mask_decoder.iou_token.weight"])


def test_the_save_path_refuses_non_finite_weights_naming_the_key(tmp_path):
    path = tmp_path / "last.ckpt"
    good = {"state_dict": {"model.a": torch.ones(3), "model.n": torch.tensor([2**62])}, "global_step": 1}
    AtomicCheckpointIO().save_checkpoint(good, path)
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}  # the file (and its manifest)
    for bad_value, counts in ((float("nan"), "1 NaN, 0 inf"), (float("-inf"), "0 NaN, 1 inf")):
        w = torch.zeros(2, 2, dtype=torch.bfloat16)
        w[1, 0] = bad_value
        bad = {"state_dict": {"model.a": torch.ones(3), "model.mask_decoder.w": w}, "global_step": 2}
        with pytest.raises(NonFiniteError, match=rf"{path}: state_dict key model.mask_decoder.w \({counts} of 4"):
            AtomicCheckpointIO().save_checkpoint(bad, path)
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before  # untouched, no temporary
    assert torch.load(path, weights_only=True)["global_step"] == 1


def test_guard_config_is_checked():
    with pytest.raises(ValueError, match="module.nonfinite.max_consecutive=0"):
        NonFiniteGuard(max_consecutive=0)
    guard = compose().module.nonfinite
    assert guard.enabled and guard.max_consecutive == 3


@pytest.mark.parametrize(
    "strategy",
    [
        pytest.param(["strategy=ddp"], id="ddp"),
        pytest.param(
            ["strategy=fsdp", "trainer.strategy.data_parallel_size=2", "precision=fp32"],
            id="fsdp",
            marks=pytest.mark.slow,  # ~1 min on 2 CPU cores
        ),
    ],
)
def test_nan_loss_on_one_rank_is_skipped_on_both(tmp_path, strategy):
    """2 gloo processes; rank 1's loss alone is NaN at step 1 (its gradients finite, so without the
    ranks' agreement rank 0 would step and rank 1 not): both skip, weights stay identical
    (under FSDP: the full weights each rank gathers)."""
    args = [
        f"paths.root_dir={tmp_path}",
        f"data.root={tmp_path}/data",
        "logger=csv",
        *strategy,
        "trainer.devices=2",
        "trainer.max_steps=3",
        "trainer.limit_val_batches=0",
        "data.num_train=8",
        "data.num_val=2",
        "data.shard_size=2",
        "data.batch_size=1",
        "data.max_masks=2",
        "data.num_workers=0",
        "prompting.point_rounds=1",
        "prompting.mask_rounds=0",
        "~callbacks.progress_bar",
        *_plant(tmp_path / "plant", [1], ranks=[1], where="loss"),
    ]
    env = dict(os.environ, WANDB_MODE="offline", HYDRA_FULL_ERROR="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])  # PlantNaN's imports
    p = subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,  # ranks that disagree hang
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    ranks = [torch.load(tmp_path / "plant" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == [2]
    for k, v in ranks[0]["weights"].items():
        assert torch.equal(v, ranks[1]["weights"][k]), k
    ((step, ids),) = json.loads((tmp_path / "plant" / "rank1.json").read_text())
    assert not (tmp_path / "plant" / "rank0.json").exists()
    log = p.stdout + p.stderr
    assert "step 1 skipped (no update): loss not finite on rank(s) [1]; images rank 0: " in log, log[-3000:]
    assert f"rank 1: {ids}" in log
    last = tmp_path / "demo" / "checkpoints" / "last.ckpt"
    ck = torch.load(last / LIGHTNING_META if last.is_dir() else last, map_location="cpu", weights_only=True)
    assert ck["global_step"] == 3 and ck["segany_nonfinite"] == {"skipped": 1, "consecutive": 0}
