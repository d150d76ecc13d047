"""Test-only callbacks and data, selected from the command line (`+callbacks.kill._target_=tests._kill.KillAt`,
`data._target_=tests._kill.DyingSynthetic`)."""

import os
import signal
import time

import pytorch_lightning as pl

from segany.data.datamodules.sa1b import SA1BStream
from segany.data.datamodules.synthetic import SyntheticDataModule


class KillAt(pl.Callback):
    """SIGKILL this process (no cleanup, no checkpoint) when training step `step` starts."""

    def __init__(self, step: int, sig: str = "SIGKILL"):
        self.step, self.sig = int(step), getattr(signal, sig)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.sig)


class HangAt(pl.Callback):
    """Rank `rank` sleeps for good when training step `step` starts: a hung rank. With
    `restart`, only in that start of a SLURM job (SLURM_RESTART_COUNT, 0 at first)."""

    def __init__(self, step: int, rank: int = 1, restart=None):
        self.step, self.rank, self.restart = int(step), int(rank), restart

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.restart is not None and int(os.environ.get("SLURM_RESTART_COUNT", 0)) != int(self.restart):
            return
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            time.sleep(3600)


class _DyingStream(SA1BStream):
    die_at, marker, calls = 0, "", 0

    def _sample(self, rec, rng, faults):
        self.calls += 1
        if self.calls == self.die_at and not os.path.exists(self.marker):
            with open(self.marker, "w") as f:  # the truth the error message is checked against
                f.write(f"{rec.source}\n{rec.key}\n")
            os.kill(os.getpid(), signal.SIGKILL)
        return super()._sample(rec, rng, faults)


class DyingSynthetic(SyntheticDataModule):
    """The demo's data, whose training worker SIGKILLs itself while decoding its sample number
    `die_at` (from 1), once: it first writes that sample's shard and key to `marker`, and a
    run that finds the marker does not die."""

    def __init__(self, die_at: int, marker: str, **kwargs):
        super().__init__(**kwargs)
        self.die_at, self.marker = int(die_at), str(marker)

    def _build_train(self):
        ds = super()._build_train()
        ds.__class__ = _DyingStream  # an SA1BStream that also dies
        ds.die_at, ds.marker = self.die_at, self.marker
        return ds
