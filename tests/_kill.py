"""Test-only callbacks, selected from the command line (`+callbacks.kill._target_=tests._kill.KillAt`)."""

import os
import signal

import pytorch_lightning as pl


class KillAt(pl.Callback):
    """SIGKILL this process (no cleanup, no checkpoint) when training step `step` starts."""

    def __init__(self, step: int, sig: str = "SIGKILL"):
        self.step, self.sig = int(step), getattr(signal, sig)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.sig)
