"""Evaluation datasets: named datamodule configs, and the raw images + original-size
annotations of their validation split (for the tasks that work in the image frame:
proposals, instances, edges). A BSDS500 folder (bsds_data.BSDS500) serves its images and
boundary maps itself.

A dataset entry is a datamodule config (``_target_: segany.data.CocoDataModule`` with
``val_annotations`` / ``val_images``, ``segany.data.SA1BDataModule`` with ``val_shards``,
``segany.data.SyntheticDataModule``, ...); the ``points`` task batches it through the
datamodule itself, the other tasks read its records (the encoded image and the COCO RLE
of every annotation) and decode them here at full resolution.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from pycocotools import mask as mask_utils

from segany.data.decode import decode_image, numeric_id

log = logging.getLogger("evaluate")


@dataclass
class EvalImage:
    key: str  # sample key (COCO: str(image id); SA-1B: sa_<id>)
    image_id: int  # COCO image id, else the digits of the key
    image: np.ndarray  # (H, W, 3) uint8 RGB
    anns: list = field(
        default_factory=list
    )  # {id, segmentation {size, counts str}, area, bbox xywh, iscrowd, category_id}
    boundaries: Optional[list] = None  # (H, W) bool maps, one per annotator (BSDS500); None: from anns

    @property
    def size(self) -> tuple:
        return self.image.shape[:2]


def dataset_configs(cfg: DictConfig) -> dict:
    """name -> datamodule config: ``cfg.datasets`` when non-empty, else {<name of cfg.data>: cfg.data}."""
    sets = cfg.get("datasets")
    if sets:
        if not isinstance(sets, DictConfig):
            raise ValueError("datasets: expected a mapping name -> datamodule config")
        for name, node in sets.items():
            if not isinstance(node, DictConfig) or "_target_" not in node:
                raise ValueError(f"datasets.{name}: needs a datamodule config with _target_")
        return dict(sets.items())
    target = OmegaConf.select(cfg, "data._target_")
    if target is None:
        raise ValueError("data: no datamodule config (_target_) and no datasets given")
    name = target.rsplit(".", 1)[-1].replace("DataModule", "").lower() or "data"
    return {name: cfg.data}


def _stem(value) -> str:
    """A path or shard spec -> a folder-name-safe stem: the file name without extension, or the
    folder's name when the file name is a pattern (sa_{000000..000009}.tar, *.tar)."""
    path = str(value[0] if isinstance(value, (list, tuple, ListConfig)) else value).rstrip("/")
    base = os.path.basename(path)
    if any(c in base for c in "*?[{"):
        base = os.path.basename(os.path.dirname(path))
    return re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.splitext(base)[0]).strip("._")


def dataset_label(datasets: dict, named: bool) -> str:
    """The datasets' part of the default output folder name. named (cfg.datasets given): the names
    joined by '+' (a count and a hash when that gets long); else the one dataset's name and the
    stem of what its validation split reads (val_annotations, val_shards, or a synthetic root)
    when that adds something: coco-instances_val2017, coco-lvis_v1_val, sa1b-val, synthetic."""
    if named:
        label = "+".join(datasets)
        return label if len(label) <= 80 else f"{len(datasets)}_datasets-{hashlib.sha1(label.encode()).hexdigest()[:8]}"
    ((name, node),) = datasets.items()
    for key in ("val_annotations", "val_shards", "root"):
        value = OmegaConf.select(node, key, default=None)
        if value:
            stem = _stem(value)
            return name if stem in ("", name) else f"{name}-{stem}"
    return name


def build_datamodule(name: str, node: DictConfig, num_workers: Optional[int] = None, img_size: Optional[int] = None):
    """Instantiate, prepare and set up the validation split of a dataset entry. img_size:
    the model's input size, which replaces the entry's own (a 192 px model gets 192 px
    batches whatever the data config says)."""
    over = {} if num_workers is None else {"num_workers": num_workers}
    if img_size is not None and "img_size" in node:
        over["img_size"] = int(img_size)
    dm = instantiate(node, **over)
    dm.prepare_data()
    dm.setup("validate")
    if getattr(dm, "val_dataset", None) is None:
        raise ValueError(f"datasets.{name}: this datamodule has no validation split (set its val_* keys)")
    return dm


def _is_box(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 4


def eval_images(
    dm, rank: int = 0, world: int = 1, max_images: Optional[int] = None, every_image: bool = False
) -> Iterator[EvalImage]:
    """The validation images of a set-up datamodule owned by `rank` of `world` (the stream's own
    split: SA-1B shards round robin, COCO images round robin), with all their annotations at
    the stored resolution, crowd ones included with iscrowd=1. max_images bounds this rank's share
    (ceil(max_images / world)).

    From an instance json (COCO, LVIS) each annotation keeps the json's ``area``, ``bbox`` and
    ``category_id``: COCOeval ranks ground truth into its area ranges by the json's area, not by
    the decoded mask's (they differ by up to thousands of pixels on real COCO polygons).
    every_image: a COCO stream lists every image of the json, also those without (non-crowd)
    annotations — COCOeval's image set, where detections are false positives (the tasks scored
    by COCOeval); other streams list their validation records as always. A source that serves raw
    images itself (bsds_data.BSDS500) is asked for them."""
    from segany.data.faults import FaultCounter

    if hasattr(dm, "eval_images"):
        yield from dm.eval_images(rank, world, max_images)
        return

    ds = dm.val_dataset
    source = getattr(ds, "coco", None)
    json_anns = {} if source is None else source.anns
    limit = None if max_images is None else -(-int(max_images) // world)
    faults = FaultCounter(20, where=f"eval rank {rank}")
    records = ds.eval_records if every_image and hasattr(ds, "eval_records") else ds._val_records
    n = 0
    for rec in records(faults, rank, world):
        if limit is not None and n >= limit:
            return
        data = rec.image() if callable(rec.image) else rec.image
        image = decode_image(data, f"{rec.source}:{rec.key}", size=(rec.height, rec.width))
        anns = []
        for j, counts in enumerate(rec.counts):
            rle = {"size": [rec.height, rec.width], "counts": counts}
            enc = {"size": rle["size"], "counts": counts.encode() if isinstance(counts, str) else counts}
            ann_id = int(rec.ids[j])
            src = json_anns.get(ann_id, {})
            anns.append(
                {
                    "id": ann_id,
                    "segmentation": rle,
                    "area": float(src["area"]) if "area" in src else float(mask_utils.area(enc)),
                    "bbox": [float(v) for v in (src["bbox"] if _is_box(src.get("bbox")) else mask_utils.toBbox(enc))],
                    "iscrowd": int(bool(rec.iscrowd[j])),
                    "category_id": int(src.get("category_id", 1)),
                }
            )
        n += 1
        yield EvalImage(rec.key, numeric_id(rec.key), image, anns)
