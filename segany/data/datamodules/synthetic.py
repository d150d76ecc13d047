"""Synthetic SA-1B-format data module: `SA1BDataModule` over random scenes
(`segany.data.scenes`) written as train and held-out val shards in prepare_data() when
they are missing, so the demo needs no download."""

from __future__ import annotations

import json
import os
from typing import Optional

from segany.data.datamodules.sa1b import SA1BDataModule
from segany.data.make_shards import write_shards
from segany.data.scenes import scene_samples
from segany.utils.io import atomic_write_json, remove


class SyntheticDataModule(SA1BDataModule):
    """SA1BDataModule over synthetic shards generated under `root` when missing.
    Keys: see configs/data/synthetic.yaml."""

    def __init__(
        self,
        root: str = "data/synthetic",
        num_train: int = 300,
        num_val: int = 50,
        shard_size: int = 100,
        min_side: int = 192,
        max_side: int = 320,
        data_seed: int = 0,
        img_size: int = 256,
        **kwargs,
    ):
        kwargs.setdefault("interleave", 2)
        super().__init__(img_size=img_size, **kwargs)
        self.root = str(root)
        self.spec = {
            "version": 1,
            "num_train": int(num_train),
            "num_val": int(num_val),
            "shard_size": int(shard_size),
            "min_side": int(min_side),
            "max_side": int(max_side),
            "data_seed": int(data_seed),
        }

    def _manifest(self) -> Optional[dict]:
        path = os.path.join(self.root, "manifest.json")
        try:
            with open(path) as f:
                found = json.load(f)
        except (OSError, ValueError):
            return None
        if found.get("spec") != self.spec:
            return None
        if not all(os.path.isfile(os.path.join(self.root, p)) for p in found["train"] + found["val"]):
            return None
        return found

    def prepare_data(self) -> None:
        if self._manifest() is not None:
            return
        s = self.spec
        manifest = os.path.join(self.root, "manifest.json")
        remove(manifest)  # until the new one is written, the shards below belong to no spec
        train = write_shards(
            scene_samples(s["num_train"], s["data_seed"], 0, s["min_side"], s["max_side"]),
            self.root,
            "train",
            s["shard_size"],
        )
        val = write_shards(
            scene_samples(s["num_val"], s["data_seed"], s["num_train"], s["min_side"], s["max_side"]),
            self.root,
            "val",
            s["shard_size"],
        )
        atomic_write_json(
            manifest,
            {"spec": s, "train": [os.path.basename(p) for p in train], "val": [os.path.basename(p) for p in val]},
            indent=1,
        )

    def _resolve_shards(self) -> None:
        """Point train_shards / val_shards at the shards of this config (generated if missing)."""
        found = self._manifest()
        if found is None:
            if self.trainer is not None:
                raise FileNotFoundError(
                    f"no synthetic shards matching this config under {self.root}: prepare_data() has not run"
                )
            self.prepare_data()
            found = self._manifest()
        self._use(found)

    def _use(self, found: dict) -> None:
        self.train_shards = [os.path.join(self.root, p) for p in found["train"]] or None
        self.val_shards = [os.path.join(self.root, p) for p in found["val"]] or None

    def _build_train(self):
        self._resolve_shards()
        return super()._build_train()

    def _build_val(self):
        self._resolve_shards()
        return super()._build_val()

    def resolve_shards(self) -> dict:
        """As SA1BDataModule.resolve_shards once prepare_data() has written the shards; {} before."""
        found = self._manifest()
        if found is None:
            return {}
        self._use(found)
        return super().resolve_shards()

    def _default_epoch_length(self, world_size: int) -> int:
        return max(1, self.spec["num_train"] // (world_size * self.batch_size))
