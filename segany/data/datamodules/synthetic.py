"""Synthetic SA-1B-format data module: `SA1BDataModule` over random scenes
(`segany.data.scenes`) written as train and held-out val shards in prepare_data() when
they are missing, so the demo needs no download.

The shards are self-describing: `root/manifest.json` holds the generator version and every
generator setting ("spec") next to the shard list. When it is missing, unreadable, names a
missing shard or holds another spec (data made by older code or other settings), the scenes
are generated again (each shard and then the manifest written atomically) and the reason is
logged."""

from __future__ import annotations

import json
import logging
import os
from typing import Optional, Sequence

from segany.data.datamodules.sa1b import SA1BDataModule
from segany.data.make_shards import write_shards
from segany.data.scenes import GENERATOR_VERSION, scene_samples
from segany.utils.io import atomic_write_json, remove

log = logging.getLogger("segany.data")


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
        objects: Sequence[int] = (3, 8),
        thin_small_frac: float = 0.3,
        line_width: Sequence[float] = (1.0, 4.0),
        small_diameter: Sequence[float] = (4.0, 16.0),
        min_visible: int = 10,
        img_size: int = 256,
        **kwargs,
    ):
        kwargs.setdefault("interleave", 2)
        super().__init__(img_size=img_size, **kwargs)
        self.root = str(root)
        if not 0.0 <= float(thin_small_frac) <= 1.0:
            raise ValueError(f"thin_small_frac={thin_small_frac}: expected a share in [0, 1]")
        for name, pair in (("objects", objects), ("line_width", line_width), ("small_diameter", small_diameter)):
            if len(pair) != 2 or not 0 < pair[0] <= pair[1]:
                raise ValueError(f"{name}={list(pair)}: expected [min, max] with 0 < min <= max")
        self.spec = {  # everything the scenes depend on; json round-trips it unchanged
            "version": GENERATOR_VERSION,
            "num_train": int(num_train),
            "num_val": int(num_val),
            "shard_size": int(shard_size),
            "min_side": int(min_side),
            "max_side": int(max_side),
            "data_seed": int(data_seed),
            "objects": [int(v) for v in objects],
            "thin_small_frac": float(thin_small_frac),
            "line_width": [float(v) for v in line_width],
            "small_diameter": [float(v) for v in small_diameter],
            "min_visible": int(min_visible),
        }

    def _check(self) -> tuple[Optional[dict], str]:
        """(the manifest, "") when root holds the shards of this spec, else (None, why not)."""
        path = os.path.join(self.root, "manifest.json")
        if not os.path.isfile(path):
            return None, f"no {path}"
        try:
            with open(path) as f:
                found = json.load(f)
            spec, shards = dict(found["spec"]), list(found["train"]) + list(found["val"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return None, f"{path} is unreadable ({type(exc).__name__}: {exc})"
        if spec != self.spec:
            keys = list(self.spec) + [k for k in spec if k not in self.spec]
            diff = [f"{k}: {spec.get(k)} -> {self.spec.get(k)}" for k in keys if spec.get(k) != self.spec.get(k)]
            return None, f"{path} was written for other settings ({'; '.join(diff)})"
        missing = [p for p in shards if not os.path.isfile(os.path.join(self.root, p))]
        if missing:
            return None, f"shard {os.path.join(self.root, missing[0])} listed in {path} is missing"
        return found, ""

    def _manifest(self) -> Optional[dict]:
        return self._check()[0]

    def _scenes(self, num: int, first_id: int):
        s = self.spec
        return scene_samples(
            num,
            s["data_seed"],
            first_id,
            s["min_side"],
            s["max_side"],
            objects=s["objects"],
            thin_small_frac=s["thin_small_frac"],
            line_width=s["line_width"],
            small_diameter=s["small_diameter"],
            min_visible=s["min_visible"],
        )

    def prepare_data(self) -> None:
        found, why = self._check()
        if found is not None:
            return
        s = self.spec
        stale = os.path.isdir(self.root) and any(not n.startswith(".") for n in os.listdir(self.root))
        log.log(
            logging.WARNING if stale else logging.INFO,
            "generating %d + %d synthetic scenes in %s: %s",
            s["num_train"],
            s["num_val"],
            self.root,
            why,
        )
        manifest = os.path.join(self.root, "manifest.json")
        remove(manifest)  # until the new one is written, the shards below belong to no spec
        train = write_shards(self._scenes(s["num_train"], 0), self.root, "train", s["shard_size"])
        val = write_shards(self._scenes(s["num_val"], s["num_train"]), self.root, "val", s["shard_size"])
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
