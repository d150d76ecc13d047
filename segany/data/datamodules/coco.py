"""COCO / LVIS instance datasets (image folder + json) in the common sample format.

Segmentations as the formats define them, through pycocotools: polygons (parts with
fewer than 3 points dropped, the rest merged), uncompressed RLE (`iscrowd` regions in
COCO) and compressed RLE. `iscrowd=1` regions are not objects but groups of them: they
are left out of the masks unless include_crowd=True. LVIS images have no `file_name`;
the file is found from `coco_url`. Images without usable annotations are left out of the
training and validation streams; `eval_records` (the tasks scored by COCOeval) lists every image.
Training streams walk a fresh permutation per pass (streams/indexed.py).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Iterator, Optional

import numpy as np

from segany.data.datamodules.base import StreamDataModule
from segany.data.faults import FaultCounter, SampleFault
from segany.data.formats import rle
from segany.data.formats.coco import image_path, load_coco, rle_counts
from segany.data.sample import Record, SampleConfig
from segany.data.streams.indexed import IndexedStream

log = logging.getLogger("segany.data")


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise SampleFault("bad_image", f"cannot read {path}: {exc.strerror or exc}") from None


class CocoStream(IndexedStream):
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
            log.info(
                "%s: %d of %d images have no usable annotation and are left out", annotations, left, len(self.coco.imgs)
            )
        if not self.image_ids:
            raise ValueError(f"{annotations}: no image has a usable annotation")

    def num_images(self) -> int:
        return len(self.image_ids)

    def record(self, idx: int, faults: FaultCounter) -> Optional[Record]:
        return self._record(self.image_ids[idx], faults)

    def _record(self, img_id: int, faults: FaultCounter, empty_ok: bool = False) -> Optional[Record]:
        """The image's record with all its annotations (crowd ones flagged); None when none is
        usable, or (empty_ok) a record without masks."""
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
        if not counts and not empty_ok:
            return None
        return Record(
            str(img_id),
            path,
            functools.partial(_read_file, path),
            info["height"],
            info["width"],
            counts,
            np.array([a["id"] for a in anns], np.int64),
            iscrowd=np.array([bool(a.get("iscrowd", 0)) for a in anns]),
        )

    def eval_records(self, faults, slot, n_slots) -> Iterator[Record]:
        """Every image of the json in id order (slot's share, round robin), with all its annotations,
        one without any as a record without masks: the image set COCOeval scores (detections on an
        image without ground truth are false positives), for the proposals and instances tasks."""
        for img_id in sorted(self.coco.imgs)[slot::n_slots]:
            yield self._record(img_id, faults, empty_ok=True)


class CocoDataModule(StreamDataModule):
    """COCO / LVIS fine-tuning and evaluation data. Keys: see configs/data/coco.yaml."""

    def __init__(
        self,
        train_annotations: Optional[str] = None,
        train_images: Optional[str] = None,
        val_annotations: Optional[str] = None,
        val_images: Optional[str] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.train_annotations, self.train_images = train_annotations, train_images
        self.val_annotations, self.val_images = val_annotations, val_images

    train_key, val_key = "train_annotations", "val_annotations"

    def _stream(self, split: str) -> Optional[CocoStream]:
        """split "train" / "val": the stream of <split>_annotations + <split>_images; errors name the key."""
        annotations, images = getattr(self, f"{split}_annotations"), getattr(self, f"{split}_images")
        if not annotations:
            return None
        if not images:
            raise ValueError(
                f"{type(self).__name__}: data.{split}_images is not set ({annotations} needs its image folder)"
            )
        if not os.path.isfile(annotations):
            raise FileNotFoundError(f"data.{split}_annotations: annotation file {annotations} does not exist")
        if not os.path.isdir(images):
            raise FileNotFoundError(f"data.{split}_images: image folder {images} does not exist")
        train = split == "train"
        return CocoStream(
            annotations,
            images,
            self.cfg,
            **self._stream_kwargs(train),
        )

    def _build_train(self) -> Optional[CocoStream]:
        return self._stream("train")

    def _build_val(self) -> Optional[CocoStream]:
        return self._stream("val")

    def _default_epoch_length(self, world_size: int) -> int:
        return max(1, len(self.train_dataset.image_ids) // (world_size * self.batch_size))
