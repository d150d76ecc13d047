"""LightningDataModule base shared by SA-1B, COCO and synthetic data: loaders and rank
binding.

The data position lives in the training loader (streams/loader.py, a torchdata
StatefulDataLoader): Lightning saves its `state_dict()` with the fit loop in the
checkpoint and restores it on resume; outside Lightning, call
`train_dataloader().state_dict()` / `.load_state_dict()`. `train_dataloader()` builds the
loader once and returns the same one afterwards, so that the position carries on from
epoch to epoch (its workers are persistent) and across `reload_dataloaders_every_n_epochs`.
"""

from __future__ import annotations

import logging
from typing import Optional

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from segany.data.sample import SampleConfig, collate
from segany.data.streams.dataset import StreamDataset
from segany.data.streams.loader import StreamLoader
from segany.utils.dist import topology

log = logging.getLogger("segany.data")


def _worker_init(_):
    # one core per worker: no oversubscription. Not cv2.setNumThreads here: in a forked worker
    # whose parent already ran a parallel OpenCV op it deadlocks (OpenCV re-creates its pool
    # lazily in the child, which is safe).
    torch.set_num_threads(1)


def sample_config(
    img_size=1024,
    max_masks=64,
    lowres_targets=False,
    max_area_frac=0.9,
    min_area=0,
    min_predicted_iou=0.0,
    min_stability_score=0.0,
    include_crowd=False,
    jitter=False,
    jitter_scale=(0.1, 2.0),
    flip=False,
    fast_jpeg=True,
) -> SampleConfig:
    """Datamodule keys -> SampleConfig. jitter: bool (range in jitter_scale);
    flip: bool (p = 0.5) or a probability."""
    flip = 0.5 if flip is True else float(flip or 0.0)
    return SampleConfig(
        img_size=int(img_size),
        max_masks=int(max_masks),
        lowres_targets=bool(lowres_targets),
        max_area_frac=float(max_area_frac),
        min_area=int(min_area),
        min_predicted_iou=float(min_predicted_iou or 0.0),
        min_stability_score=float(min_stability_score or 0.0),
        include_crowd=bool(include_crowd),
        jitter=tuple(jitter_scale) if jitter else None,
        flip=flip,
        fast_jpeg=bool(fast_jpeg),
    )


class StreamDataModule(pl.LightningDataModule):
    def __init__(
        self,
        *,
        batch_size: int = 1,
        val_batch_size: Optional[int] = None,
        num_workers: int = 4,
        epoch_length: Optional[int] = None,
        seed: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
        persistent_workers: bool = True,
        max_fault_warnings: int = 20,
        **sample_kwargs,
    ):
        super().__init__()
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.epoch_length = None if epoch_length is None else int(epoch_length)
        self.seed = int(seed)
        self.pin_memory = bool(pin_memory)
        self.prefetch_factor = int(prefetch_factor)
        self.persistent_workers = bool(persistent_workers)
        self.max_fault_warnings = int(max_fault_warnings)
        self.cfg = sample_config(**sample_kwargs)
        self.train_dataset: Optional[StreamDataset] = None
        self.val_dataset: Optional[StreamDataset] = None
        self._train_loader: Optional[StreamLoader] = None

    # -- subclass interface ----------------------------------------------------------------
    train_key = "train_*"  # the config key(s) of the training split, for errors
    val_key = "val_*"

    def _build_train(self) -> Optional[StreamDataset]:
        """The training stream, None when no training split is configured; checks its paths."""
        raise NotImplementedError

    def _build_val(self) -> Optional[StreamDataset]:
        """The validation stream, None when no validation split is configured; checks its paths."""
        raise NotImplementedError

    def _stream_kwargs(self, train: bool) -> dict:
        """The split-dependent keywords every stream takes (batch size, epoch length, seed, faults)."""
        return dict(
            train=train,
            batch_size=self.batch_size if train else self.val_batch_size,
            epoch_length=self.epoch_length,
            seed=self.seed,
            max_fault_warnings=self.max_fault_warnings,
        )

    def _default_epoch_length(self, world_size: int) -> Optional[int]:
        return None

    # -- Lightning hooks -----------------------------------------------------------------
    def setup(self, stage: Optional[str] = None) -> None:
        """Build (once) the splits `stage` reads, checking only their paths: "fit" the training
        split, which must be configured, and the validation split; "validate" / "test" /
        "predict" the validation split only (evaluation never needs the training paths);
        None every configured split."""
        name = type(self).__name__
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._build_train()
            if self.train_dataset is None and stage == "fit":
                raise ValueError(f"{name}: training needs a training split; data.{self.train_key} is not set")
        if self.val_dataset is None:
            self.val_dataset = self._build_val()
        if stage is None and self.train_dataset is None and self.val_dataset is None:
            raise ValueError(f"{name}: neither data.{self.train_key} nor data.{self.val_key} is set")

    def _loader(self, ds: StreamDataset, batch_size: int, cls=DataLoader) -> DataLoader:
        extra = {}
        if self.num_workers > 0:
            # training: always persistent, the workers' datasets hold the stream positions from epoch
            # to epoch; validation: persistent_workers (on by default) keeps its worker processes from
            # one validation run to the next, instead of starting them again each time
            extra = dict(
                prefetch_factor=self.prefetch_factor,
                worker_init_fn=_worker_init,
                persistent_workers=cls is StreamLoader or self.persistent_workers,
            )
        return cls(
            ds,
            batch_size=batch_size,
            num_workers=self.num_workers,
            collate_fn=collate,
            pin_memory=self.pin_memory,
            **extra,
        )

    def train_dataloader(self) -> StreamLoader:
        self.setup("fit")
        if self.train_dataset is None:
            raise ValueError(f"{type(self).__name__}: no training data configured")
        rank, world = topology(trainer=self.trainer)
        ds = self.train_dataset
        if self._train_loader is None or (ds.rank, ds.world_size) != (rank, world):
            ds.set_topology(rank, world)
            ds.epoch_length = self.epoch_length or self._default_epoch_length(world)
            self._train_loader = self._loader(ds, self.batch_size, StreamLoader)
        self._warn_if_epochs_are_cut()
        return self._train_loader

    def _warn_if_epochs_are_cut(self) -> None:
        limit = getattr(self.trainer, "limit_train_batches", None)
        if limit is None or getattr(self.trainer, "fast_dev_run", False):
            return
        n = self.train_dataset.epoch_length
        if (isinstance(limit, int) and limit < n) or (isinstance(limit, float) and limit < 1.0):
            log.warning(
                "trainer.limit_train_batches=%s is shorter than the training streams' epoch of %d batches: "
                "each stream epoch is finished over the following Lightning epochs (no data skipped), so "
                "Lightning's epochs vary in length; set data.epoch_length instead",
                limit,
                n,
            )

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        if self.val_dataset is None:
            return []
        self.val_dataset.set_topology(*topology(trainer=self.trainer))
        return self._loader(self.val_dataset, self.val_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    # -- checkpoint ------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        # checkpoints written before the position moved into the loader (data state version 1)
        log.warning(
            "%s: this checkpoint holds a data position in an old format (version %s), which is not "
            "restored: the training streams start afresh",
            type(self).__name__,
            state_dict.get("version"),
        )
