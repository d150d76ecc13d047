"""COCO / LVIS instance datasets (image folder + json) in the common sample format.

Segmentations as the formats define them, through pycocotools: polygons (parts with
fewer than 3 points dropped, the rest merged), uncompressed RLE (`iscrowd` regions in
COCO) and compressed RLE. `iscrowd=1` regions are not objects but groups of them: they
are left out of the masks unless include_crowd=True. LVIS images have no `file_name`;
the file is found from `coco_url`. Images without annotations are left out at setup.
Training streams walk a fresh permutation per pass (seeded by seed and pass), split by
rank x worker, and resume from (pass, index) like the SA-1B streams.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
from typing import Iterator, Optional

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from . import rle
from .datamodule import StreamDataModule
from .faults import FaultCounter, SampleFault
from .sample import Record, SampleConfig
from .stream import StreamDataset

log = logging.getLogger("datamodules")


def load_coco(path: str) -> COCO:
    """Load and check an instance json; errors name the file and the field."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file {path} does not exist")
    with open(path) as f:
        try:
            data = json.load(f)
        except ValueError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from None
    for field in ("images", "annotations"):
        if not isinstance(data.get(field) if isinstance(data, dict) else None, list):
            raise ValueError(f"{path}: missing list field '{field}' (not a COCO/LVIS instance file)")
    for i, img in enumerate(data["images"]):
        for field in ("id", "height", "width"):
            if not isinstance(img.get(field), int):
                raise ValueError(f"{path}: images[{i}] has no integer '{field}'")
        if not img.get("file_name") and not img.get("coco_url"):
            raise ValueError(f"{path}: images[{i}] has neither 'file_name' nor 'coco_url'")
    for i, ann in enumerate(data["annotations"]):
        for field in ("id", "image_id"):
            if not isinstance(ann.get(field), int):
                raise ValueError(f"{path}: annotations[{i}] has no integer '{field}'")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    unknown = [a["id"] for a in data["annotations"] if a["image_id"] not in coco.imgs]
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} annotations refer to images that are not listed "
                         f"(e.g. annotation {unknown[0]})")
    return coco


def image_path(images_dir: str, info: dict) -> str:
    """File of an image entry: file_name (COCO), else from coco_url (LVIS)."""
    names = []
    if info.get("file_name"):
        names.append(info["file_name"])
    if info.get("coco_url"):
        parts = info["coco_url"].rstrip("/").split("/")
        names += [parts[-1], "/".join(parts[-2:])]
    if not names:
        raise ValueError(f"image {info.get('id')} has neither file_name nor coco_url")
    for name in names:
        if os.path.isfile(os.path.join(images_dir, name)):
            return os.path.join(images_dir, name)
    return os.path.join(images_dir, names[0])


def rle_counts(coco: COCO, ann: dict) -> str:
    """Compressed RLE string of an annotation's segmentation; ValueError says why not."""
    info = coco.imgs[ann["image_id"]]
    h, w = info["height"], info["width"]
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        parts = [p for p in seg if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
        if not parts:
            raise ValueError("polygon with fewer than 3 points")
        out = mask_utils.merge(mask_utils.frPyObjects(parts, h, w))
    elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if list(seg["size"]) != [h, w]:
            raise ValueError(f"segmentation.size {seg['size']} but the image is {h}x{w}")
        if isinstance(seg["counts"], list):
            if sum(seg["counts"]) != h * w:
                raise ValueError(f"uncompressed RLE covers {sum(seg['counts'])} pixels, not {h * w}")
            out = mask_utils.frPyObjects(seg, h, w)
        else:
            out = seg
    else:
        raise ValueError("no polygon or RLE segmentation")
    counts = out["counts"]
    return counts.decode("ascii") if isinstance(counts, bytes) else str(counts)


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise SampleFault("bad_image", f"cannot read {path}: {exc.strerror or exc}") from None


class CocoStream(StreamDataset):
    def __init__(self, annotations: str, images_dir: str, cfg: SampleConfig, **kw):
        super().__init__(cfg, **kw)
        if not os.path.isdir(images_dir):
            raise FileNotFoundError(f"image folder {images_dir} does not exist")
        self.coco = load_coco(annotations)
        self.images_dir = images_dir
        usable = lambda a: cfg.include_crowd or not a.get("iscrowd", 0)  # noqa: E731
        self.image_ids = [i for i in sorted(self.coco.imgs) if any(usable(a) for a in self.coco.imgToAnns.get(i, []))]
        left = len(self.coco.imgs) - len(self.image_ids)
        if left:
            log.info("%s: %d of %d images have no usable annotation and are left out", annotations, left,
                     len(self.coco.imgs))
        if not self.image_ids:
            raise ValueError(f"{annotations}: no image has a usable annotation")

    def record(self, idx: int, faults: FaultCounter) -> Optional[Record]:
        img_id = self.image_ids[idx]
        info = self.coco.imgs[img_id]
        path = image_path(self.images_dir, info)
        counts, anns = [], []
        for ann in self.coco.imgToAnns[img_id]:
            try:
                counts.append(rle_counts(self.coco, ann))
                anns.append(ann)
            except Exception as exc:  # noqa: BLE001 - pycocotools raises several kinds
                faults.add("bad_annotation", path, f"{img_id}/{ann['id']}", str(exc) or repr(exc))
        if counts:
            ok = rle.parse(counts, [info["height"]] * len(counts), [info["width"]] * len(counts)).valid
            for i in np.flatnonzero(~ok):
                faults.add("bad_annotation", path, f"{img_id}/{anns[i]['id']}", "invalid RLE")
            counts = [c for c, v in zip(counts, ok) if v]
            anns = [a for a, v in zip(anns, ok) if v]
        if not counts:
            return None
        return Record(str(img_id), path, functools.partial(_read_file, path), info["height"], info["width"],
                      counts, np.array([a["id"] for a in anns], np.int64),
                      iscrowd=np.array([bool(a.get("iscrowd", 0)) for a in anns]))

    def _val_records(self, faults, slot, n_slots) -> Iterator[Record]:
        for idx in range(slot, len(self.image_ids), n_slots):
            rec = self.record(idx, faults)
            if rec is not None:
                yield rec

    def _fresh_position(self, rng, slot, n_slots) -> dict:
        return {"pass": 0, "index": 0}

    def _train_records(self, position, rng, faults, slot, n_slots) -> Iterator[Record]:
        n = len(self.image_ids)
        while True:
            order = np.random.default_rng([self.seed, position["pass"]]).permutation(n)
            mine = order[slot::n_slots] if slot < n else order[slot % n:slot % n + 1]
            usable = position["index"] > 0
            while position["index"] < len(mine):
                idx = int(mine[position["index"]])
                position["index"] += 1
                rec = self.record(idx, faults)
                if rec is not None:
                    usable = True
                    yield rec
            if not usable:
                raise RuntimeError(f"no image of this worker's share of {len(mine)} has a usable annotation; "
                                   "see the warnings")
            position["pass"] += 1
            position["index"] = 0


class CocoDataModule(StreamDataModule):
    """COCO / LVIS fine-tuning and evaluation data. Keys: see configs/data/coco.yaml."""

    def __init__(self, train_annotations: Optional[str] = None, train_images: Optional[str] = None,
                 val_annotations: Optional[str] = None, val_images: Optional[str] = None, **kwargs):
        super().__init__(**kwargs)
        self.train_annotations, self.train_images = train_annotations, train_images
        self.val_annotations, self.val_images = val_annotations, val_images

    def _stream(self, annotations, images, train: bool) -> Optional[CocoStream]:
        if not annotations:
            return None
        if not images:
            raise ValueError(f"{type(self).__name__}: {annotations} needs its image folder")
        return CocoStream(annotations, images, self.cfg, train=train,
                          batch_size=self.batch_size if train else self.val_batch_size,
                          epoch_length=self.epoch_length, seed=self.seed, max_fault_warnings=self.max_fault_warnings)

    def _build(self):
        if not self.train_annotations and not self.val_annotations:
            raise ValueError(f"{type(self).__name__}: neither train_annotations nor val_annotations is set")
        return (self._stream(self.train_annotations, self.train_images, True),
                self._stream(self.val_annotations, self.val_images, False))

    def _default_epoch_length(self, world_size: int) -> int:
        return max(1, len(self.train_dataset.image_ids) // (world_size * self.batch_size))
