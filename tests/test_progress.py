"""Progress display: tqdm's bar on a terminal, one line per period in a file."""

import logging
import os
import re
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
from helpers import ROOT, compose
from hydra.utils import instantiate
from pytorch_lightning.callbacks import TQDMProgressBar

from segany.callbacks import progress
from segany.callbacks.progress import LineProgress, progress_bar


def test_train_py_into_a_file_writes_one_line_per_period_with_the_step(tmp_path):
    """train.py with stdout a file (not a terminal): 6 steps, every_n_steps 5 -> lines after the
    first step, step 5 and the last (6); an epoch is 4 images / 2 = 2 steps, each followed by a
    validation and its line. The tqdm bar would have written a frame per step and batch."""
    log = tmp_path / "train.log"
    args = [
        sys.executable,
        "train.py",
        "logger=csv",
        f"paths.root_dir={tmp_path}",
        "trainer.max_steps=6",
        "trainer.limit_val_batches=1",
        "trainer.check_val_every_n_epoch=1",
        "data.num_workers=0",
        f"data.root={tmp_path}/synthetic",
        "data.num_train=4",
        "data.num_val=4",
        "data.shard_size=4",
        "data.batch_size=2",
        "data.max_masks=3",
        "prompting.point_rounds=1",
        "prompting.mask_rounds=1",
        "callbacks.time_budget=null",
        "callbacks.progress_bar.every_n_steps=5",
        "callbacks.progress_bar.every_s=1000",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        subprocess.run(args, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=600, check=True)
    text = log.read_text()
    assert "\r" not in text and "it/s]" not in text  # no tqdm frames
    train = re.findall(r"\] - step (\d+)/6 \(\d+%\) \| loss [\d.]+ \| lr [\d.e+-]+ \| [\d.]+ s/step", text)
    assert [int(s) for s in train] == [1, 5, 6]
    val = re.findall(r"validation at step (\d+): 1 batches in [\d.]+ s \| val/iou_last [\d.]+ \| val/loss", text)
    assert [int(s) for s in val] == [2, 4, 6]
    assert sum("segany.callbacks.progress" in line for line in text.splitlines()) == 6


class ConstantLoss(pl.LightningModule):
    """training_step returns the step number as its loss: the mean per line is known by hand."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(1, 1)

    def training_step(self, batch, i):
        return self.lin(batch[0]).sum() * 0 + float(self.global_step + 1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(64, 1)), batch_size=2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_a_line_every_every_s_seconds_with_the_mean_loss_since_the_last(monkeypatch, caplog):
    """A clock at 10 s per step and every_s=30: lines after steps 1 (the first), 4, 7, 10; the
    loss of step s is s, so the lines show the means 1, (2+3+4)/3, 6 and 9; 10 s/step."""
    clock = {"t": 0.0}
    monkeypatch.setattr(progress, "_clock", lambda: clock["t"])

    class Tick(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            clock["t"] += 10.0

    bar = LineProgress(every_n_steps=1000, every_s=30.0)
    trainer = pl.Trainer(
        max_steps=10,
        callbacks=[Tick(), bar],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    with caplog.at_level(logging.INFO, logger=progress.__name__):
        trainer.fit(ConstantLoss())
    lines = [r.getMessage() for r in caplog.records if r.name == progress.__name__]
    assert [ln.split(" | ")[:2] for ln in lines] == [
        ["step 1/10 (10%)", "loss 1.0000"],
        ["step 4/10 (40%)", "loss 3.0000"],
        ["step 7/10 (70%)", "loss 6.0000"],
        ["step 10/10 (100%)", "loss 9.0000"],
    ]
    assert all("| lr 5.00e-01 | 10.000 s/step |" in ln for ln in lines)
    assert lines[1].endswith("0:00:40 elapsed, ~0:01:00 left")  # 6 steps x 10 s


@pytest.mark.parametrize("tty", [True, False])
def test_the_configured_progress_bar_is_tqdm_on_a_terminal_only(monkeypatch, tty):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: tty)
    bar = instantiate(compose().callbacks.progress_bar)
    assert type(bar) is (TQDMProgressBar if tty else LineProgress)
    # mode forces one or the other whatever stdout is
    assert type(progress_bar(mode="bar")) is TQDMProgressBar
    assert type(progress_bar(mode="lines")) is LineProgress


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="callbacks.progress_bar.mode='tqdm'"):
        progress_bar(mode="tqdm")
    with pytest.raises(ValueError, match="every_n_steps=0"):
        LineProgress(every_n_steps=0)
