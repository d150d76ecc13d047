"""Fine-tuning data with a share of general data mixed into every training stream.

Fine-tuning on a narrow domain can make SAM forget how to segment anything else; replaying a
little general data is the usual remedy. `MixedDataModule` wraps two datamodules of any kind
(COCO / LVIS, SA-1B shards, synthetic scenes, ...): each training sample comes from the
general one with probability `share`, else from the target one, through the same
`MixtureStream` as the SA-1B source mixture (each stream keeps its own position and sample
filters; a resumed run continues exactly). Validation, the epoch length and the loader
settings are the target's; the general samples are made at the target's input size.

    python train.py experiment=finetune +mix=synthetic mix.share=0.2   # configs/mix/synthetic.yaml
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

from segany.data.datamodules.base import StreamDataModule
from segany.data.datamodules.mixture import MixtureStream
from segany.data.streams.dataset import StreamDataset

log = logging.getLogger("segany.data")


class MixedDataModule(StreamDataModule):
    """target: the fine-tuning datamodule (training and validation splits); general: a
    datamodule whose training split is replayed; share: P(a sample is general), in (0, 1)."""

    def __init__(self, target: StreamDataModule, general: StreamDataModule, share: float = 0.2):
        for name, dm in (("target", target), ("general", general)):
            if not isinstance(dm, StreamDataModule):
                raise TypeError(f"mix.{name}: expected a segany datamodule, got {type(dm).__name__}")
        if isinstance(share, bool) or not 0.0 < float(share) < 1.0:
            raise ValueError(f"mix.share={share!r}: the share of general samples, in (0, 1)")
        super().__init__(
            batch_size=target.batch_size,
            val_batch_size=target.val_batch_size,
            num_workers=target.num_workers,
            epoch_length=target.epoch_length,
            seed=target.seed,
            pin_memory=target.pin_memory,
            prefetch_factor=target.prefetch_factor,
            persistent_workers=target.persistent_workers,
            max_fault_warnings=target.max_fault_warnings,
        )
        self.cfg = target.cfg
        self.target, self.general, self.share = target, general, float(share)
        # the general samples at the target's input size (its own filters and augmentation kept)
        general.cfg = dataclasses.replace(general.cfg, img_size=target.cfg.img_size)

    train_key, val_key = "train_* (mix.target)", "val_* (mix.target)"

    def prepare_data(self) -> None:
        for dm in (self.target, self.general):
            dm.prepare_data()

    def _build_train(self) -> Optional[StreamDataset]:
        target, general = self.target._build_train(), self.general._build_train()
        if target is None:
            return None
        if general is None:
            raise ValueError(f"mix.general ({type(self.general).__name__}): no training split to mix in")
        self.target.train_dataset = target  # its natural epoch length is the mixture's
        log.info("data mix: target %.3f, general %.3f", 1 - self.share, self.share)
        return MixtureStream(
            [target, general],
            [1 - self.share, self.share],
            ["target", "general"],
            [None, None],
            self.cfg,
            batch_size=self.batch_size,
            epoch_length=self.epoch_length,
            seed=self.seed,
            max_fault_warnings=self.max_fault_warnings,
        )

    def _build_val(self) -> Optional[StreamDataset]:
        return self.target._build_val()

    def _default_epoch_length(self, world_size: int) -> Optional[int]:
        return self.target._default_epoch_length(world_size)
