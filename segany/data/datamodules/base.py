"""LightningDataModule base shared by SA-1B, COCO and synthetic data: loaders, rank
binding, and the data position in the checkpoint.

Position tracking: each training batch carries `_data_state` (see stream.py). The
`on_before_batch_transfer` hook, which Lightning calls on the batch the training step is
about to consume, removes it from the batch and records it per worker. `state_dict()`
gathers these from every rank (one all_gather at checkpoint time) so that rank 0's
checkpoint holds all of them; `load_state_dict()` keeps them until the next
`train_dataloader()`, where each rank picks its own. A LightningModule that overrides
`on_before_batch_transfer` is ignored by Lightning in favour of this one (it warns);
outside Lightning, call `datamodule.on_before_batch_transfer(batch, 0)` on each batch.
"""

from __future__ import annotations

import logging
from typing import Optional

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from segany.data.sample import SampleConfig, collate
from segany.data.streams.dataset import StreamDataset
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
        self.max_fault_warnings = int(max_fault_warnings)
        self.cfg = sample_config(**sample_kwargs)
        self.train_dataset: Optional[StreamDataset] = None
        self.val_dataset: Optional[StreamDataset] = None
        self._positions: dict = {}  # worker -> latest consumed position (this rank)
        self._loaded: Optional[dict] = None

    # -- subclass interface ----------------------------------------------------------------
    train_key = "train_*"   # the config key(s) of the training split, for errors
    val_key = "val_*"

    def _build_train(self) -> Optional[StreamDataset]:
        """The training stream, None when no training split is configured; checks its paths."""
        raise NotImplementedError

    def _build_val(self) -> Optional[StreamDataset]:
        """The validation stream, None when no validation split is configured; checks its paths."""
        raise NotImplementedError

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

    def _loader(self, ds: StreamDataset, batch_size: int) -> DataLoader:
        extra = {}
        if self.num_workers > 0:
            extra = dict(prefetch_factor=self.prefetch_factor, worker_init_fn=_worker_init)
        return DataLoader(
            ds,
            batch_size=batch_size,
            num_workers=self.num_workers,
            collate_fn=collate,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            **extra,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        if self.train_dataset is None:
            raise ValueError(f"{type(self).__name__}: no training data configured")
        rank, world = topology(trainer=self.trainer)
        ds = self.train_dataset
        ds.set_topology(rank, world)
        ds.epoch_length = self.epoch_length or self._default_epoch_length(world)
        self._apply_loaded(rank, world)
        ds.resume = self._positions  # same dict: workers see the latest consumed positions
        return self._loader(ds, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        if self.val_dataset is None:
            return []
        self.val_dataset.set_topology(*topology(trainer=self.trainer))
        return self._loader(self.val_dataset, self.val_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if isinstance(batch, dict):
            state = batch.pop("_data_state", None)
            if state is not None:
                self._positions[state["worker"]] = state
        return batch

    # -- checkpoint ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        rank, world = topology(trainer=self.trainer)
        mine = {
            "rank": rank,
            "world_size": world,
            "num_workers": self.num_workers,
            "workers": {int(k): v for k, v in self._positions.items()},
        }
        everyone = [mine]
        if torch.distributed.is_available() and torch.distributed.is_initialized() and world > 1:
            everyone = [None] * world
            torch.distributed.all_gather_object(everyone, mine)
        return {"version": 1, "seed": self.seed, "ranks": everyone}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("version") != 1:
            raise ValueError(f"{type(self).__name__}: unknown data state version {state_dict.get('version')!r}")
        self._loaded = state_dict

    def _apply_loaded(self, rank: int, world: int) -> None:
        if self._loaded is None:
            return
        saved, self._loaded = self._loaded, None
        entry = next((r for r in saved["ranks"] if r["rank"] == rank), None)
        fits = (
            entry is not None
            and entry["world_size"] == world
            and entry["num_workers"] == self.num_workers
            and saved.get("seed") == self.seed
        )
        if fits:
            self._positions.clear()
            self._positions.update({int(k): v for k, v in entry["workers"].items()})
            return
        done = sum(s["samples"] for r in saved["ranks"] for s in r["workers"].values())
        log.warning(
            "%s: the saved data position (world size %s, %s workers, seed %s) does not fit this run "
            "(world size %s, %s workers, seed %s); streams restart from fresh positions seeded by the "
            "%d samples already consumed, so data is neither replayed nor resumed exactly",
            type(self).__name__,
            saved["ranks"][0]["world_size"],
            saved["ranks"][0]["num_workers"],
            saved.get("seed"),
            world,
            self.num_workers,
            self.seed,
            done,
        )
        self.train_dataset.restart_salt = done
