"""TimeBudget: a step-planned run shrunk to what fits in max_time; the lr milestones and
cooldown, fractions of max_steps, follow it (SamModule's lr_scheduler_step). The wall clock
is replaced by a simulated one (a fixed number of seconds per step), so every expected
number is computed by hand."""

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Timer

from segany.callbacks import TimeBudget
from segany.training import SamModule, WarmupStepDecay


class StepClock(Timer):
    """A Timer whose clock reads ``sec_per_step`` x the optimiser steps taken."""

    def __init__(self, duration_s: float, sec_per_step: float):
        super().__init__(duration={"seconds": duration_s}, interval="step", verbose=False)
        self.sec_per_step, self.trainer = sec_per_step, None

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        self.trainer = trainer

    def time_elapsed(self, stage="train"):
        return 0.0 if self.trainer is None else self.trainer.global_step * self.sec_per_step


class Tiny(pl.LightningModule):
    """milestones / cooldown: fractions of max_steps, as in the configs."""

    lr_scheduler_step = SamModule.lr_scheduler_step  # the schedule follows trainer.max_steps, as in training

    def __init__(self, warmup=2, milestones=(0.8,), cooldown=()):
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)
        self.schedule = WarmupStepDecay(warmup, milestones, 0.1, cooldown=cooldown)
        self.lrs = []

    def training_step(self, batch, i):
        self.lrs.append(self.optimizers().param_groups[0]["lr"])
        return self.lin(batch[0]).pow(2).mean()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 2)), batch_size=4)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=1.0)
        self.schedule.set_max_steps(self.trainer.max_steps)  # as SamOptim(model, max_steps)
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, self.schedule), "interval": "step"},
        }


def fit(module, callbacks, max_steps=100):
    trainer = pl.Trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module)
    return trainer


def test_a_slow_machine_runs_the_whole_schedule_shrunk_to_the_budget():
    # plan: 100 steps, lr / 10 at 80. Budget 31 s at 0.5 s/step, 1 s reserve: 60 steps fit.
    module = Tiny()
    budget = TimeBudget(calibrate_steps=10, every=10, reserve_s=1.0)
    trainer = fit(module, [StepClock(31.0, 0.5), budget])
    assert trainer.global_step == 60  # ended by the shrunk max_steps
    assert module.schedule.milestones == [48]  # 80 x 60 / 100
    lrs = torch.tensor(module.lrs)  # lr used at steps 0..59
    assert torch.allclose(lrs[2:48], torch.ones(46)) and torch.allclose(lrs[48:], torch.full((12,), 0.1))
    assert budget.state_dict() == {"planned": 100, "max_steps": 60}


def test_the_linear_cooldown_shrinks_with_the_plan():
    # plan: 100 steps, lr ramps 1 -> 0 over steps 50..100. 60 steps fit: ramp 30..60.
    module = Tiny(milestones=(), cooldown=(0.5, 1.0))
    budget = TimeBudget(calibrate_steps=10, every=10, reserve_s=1.0)
    trainer = fit(module, [StepClock(31.0, 0.5), budget])
    assert trainer.global_step == 60 and module.schedule.cooldown == [30, 60]
    lrs = torch.tensor(module.lrs)
    expected = torch.tensor([1 - (t - 30) / 30 for t in range(30, 60)])
    assert torch.allclose(lrs[2:31], torch.ones(29)) and torch.allclose(lrs[30:], expected)
    assert budget.state_dict()["planned"] == 100  # the plan, kept for resumes


def test_a_shrink_inside_the_cooldown_takes_the_ramp_along():
    # ramp 20..100 of the plan; first estimate at step 30 -> 50 steps: the ramp is 10..50 from then on
    module = Tiny(milestones=(), cooldown=(0.2, 1.0))
    trainer = fit(module, [StepClock(26.0, 0.5), TimeBudget(calibrate_steps=30, every=5, reserve_s=1.0)])
    assert trainer.global_step == 50 and module.schedule.cooldown == [10, 50]
    assert module.lrs[29] == pytest.approx(1 - (29 - 20) / 80)  # before the estimate: the plan's ramp
    assert module.lrs[31:] == pytest.approx([1 - (t - 10) / 40 for t in range(31, 50)])


def test_a_fast_machine_keeps_the_plan():
    module = Tiny()
    trainer = fit(module, [StepClock(1000.0, 0.5), TimeBudget(calibrate_steps=10, every=10)])
    assert trainer.global_step == 100 and module.schedule.milestones == [80]
    assert torch.allclose(torch.tensor(module.lrs[80:]), torch.full((20,), 0.1))


def test_a_passed_milestone_stays_and_without_max_time_nothing_changes():
    # the first estimate comes after the milestone (step 30 > 20): only max_steps shrinks
    module = Tiny(milestones=(0.2,))
    trainer = fit(module, [StepClock(26.0, 0.5), TimeBudget(calibrate_steps=30, every=5, reserve_s=1.0)])
    assert trainer.global_step == 50 and module.schedule.milestones == [10]  # 0.2 x 50, still behind
    assert module.lrs[2:20] == pytest.approx([1.0] * 18) and module.lrs[20:] == pytest.approx([0.1] * 30)
    module = Tiny()
    trainer = fit(module, [TimeBudget(calibrate_steps=5, every=5)])
    assert trainer.global_step == 100 and module.schedule.milestones == [80]


class StopAt(pl.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def test_a_resumed_run_keeps_the_shrunk_plan(tmp_path):
    # first run: the budget shrinks 100 -> 60 steps (milestone 80 -> 48), interrupted at step 40
    module = Tiny()
    trainer = fit(module, [StepClock(31.0, 0.5), TimeBudget(calibrate_steps=10, every=10, reserve_s=1.0), StopAt(40)])
    assert trainer.global_step == 40 and trainer.max_steps == 60
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    # resumed with the plan's max_steps=100 and a budget that never re-estimates: only the
    # checkpointed state can bring back 60 (the 31 s clock alone would stop at step 62)
    module = Tiny()
    trainer = pl.Trainer(
        max_steps=100,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[StepClock(31.0, 0.5), TimeBudget(calibrate_steps=1000, every=10)],
    )
    trainer.fit(module, ckpt_path=ckpt)
    assert trainer.global_step == 60 and module.schedule.milestones == [48]
    assert torch.allclose(torch.tensor(module.lrs), torch.tensor([1.0] * 8 + [0.1] * 12))  # steps 40..59
