"""Your own data as image folders: per-object binary mask PNGs, instance-id PNGs or labelme json
(formats/folders.py and formats/labelme.py say which file is what), in the common sample format.

One FolderDataModule reads all three, chosen by `format`; configs/data/{binary_pngs,
instance_pngs,labelme}.yaml. Every image is a Record of its objects (compressed RLE, ids = the
object numbers / mask values / labelme object order); an instance-id PNG's ignore_value region
is one more annotation with iscrowd=True and id 0 (left out of the masks unless include_crowd, as
a COCO crowd region; the benchmarks' noc task reads it as the region its IoU leaves out).

Faults (segany/data/faults.py), counted and named, never ending the run: an image that cannot be
read (bad_image), a mask file that does not decode or has another size than its image
(bad_annotation: that object is dropped, the image's other objects kept), a labelme json that does
not parse or lacks its fields (bad_json), a labelme shape that cannot be drawn (bad_annotation),
an image left without any object (no_annotations).
Training streams walk a fresh permutation per pass (streams/indexed.py).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Union

import numpy as np
from PIL import Image

from segany.data.datamodules.base import StreamDataModule
from segany.data.datamodules.coco import _read_file
from segany.data.faults import FaultCounter, SampleFault
from segany.data.formats import folders, labelme
from segany.data.formats.masks import binary_mask, label_image, split_labels
from segany.data.formats.sa1b import rle
from segany.data.sample import Record, SampleConfig
from segany.data.streams.indexed import IndexedStream

log = logging.getLogger("segany.data")

FORMATS = ("binary_pngs", "instance_pngs", "labelme")
IGNORE_ID = 0  # annotation id of an ignore region (object ids of id PNGs are non-zero mask values)


@dataclass
class Objects:
    """One image and its objects as read from the files, each mask a compressed RLE string (encoded
    as it is read: one dense mask in memory at a time)."""

    key: str
    source: str  # the image file (the json for labelme), for messages
    image: Union[bytes, Callable[[], bytes]]
    height: int
    width: int
    ids: np.ndarray  # (A,) int64
    counts: list  # (A,) compressed RLE strings
    ignore: Optional[str] = None  # RLE of the ignore region; None when it has no pixel
    labels: Optional[list] = None  # (A,) str: labelme labels


def encode(objects: Iterable, ignore: Optional[np.ndarray] = None) -> tuple:
    """(id, (h, w) bool mask) pairs -> (ids (A,) int64, RLE strings, ignore RLE or None), leaving out
    masks without a pixel (no object: RITM drops them too)."""
    ids, counts = [], []
    for k, m in objects:
        if m.any():
            ids.append(int(k))
            counts.append(rle(m)["counts"])
    ign = rle(ignore)["counts"] if ignore is not None and ignore.any() else None
    return np.array(ids, np.int64), counts, ign


def objects_record(obj: Objects) -> Record:
    """Objects -> Record; the ignore region (if any) is a crowd annotation of id IGNORE_ID."""
    counts, ids, crowd = list(obj.counts), obj.ids, [False] * len(obj.ids)
    if obj.ignore is not None:
        counts.append(obj.ignore)
        ids = np.append(ids, IGNORE_ID)
        crowd.append(True)
    return Record(obj.key, obj.source, obj.image, obj.height, obj.width, counts, ids, iscrowd=np.array(crowd))


def image_size(path: str) -> tuple:
    """(h, w) from the image file's header (nothing decoded); SampleFault bad_image if unreadable."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except Exception as exc:  # noqa: BLE001 - Pillow raises several kinds
        raise SampleFault("bad_image", f"cannot read {path}: {exc}") from None
    return h, w


class FolderStream(IndexedStream):
    def __init__(
        self,
        format: str,
        images_dir: Optional[str],
        annotations_dir: str,
        list_file: Optional[str],
        ignore_value: Optional[int],
        cfg: SampleConfig,
        **kw,
    ):
        super().__init__(cfg, **kw)
        self.format, self.images_dir, self.annotations_dir = format, images_dir, annotations_dir
        self.ignore_value = ignore_value
        if format == "labelme":
            files = folders.labelme_files(annotations_dir)
            self.items = [(s, files[s]) for s in folders.select(files, list_file, annotations_dir)]
            where = f"{annotations_dir}: no labelme .json"
        else:
            images = folders.images_by_stem(images_dir)
            stems = folders.select(images, list_file, images_dir)
            if format == "binary_pngs":
                masks = folders.binary_png_objects(annotations_dir, stems)
            else:
                masks = folders.instance_png_files(annotations_dir, stems)
            self.items = [(s, os.path.join(images_dir, images[s]), masks[s]) for s in stems if s in masks]
            left = len(stems) - len(self.items)
            if left:
                log.warning(
                    "%s: %d of %d images have no mask in %s and are left out",
                    images_dir,
                    left,
                    len(stems),
                    annotations_dir,
                )
            where = f"{images_dir}: no image with a mask in {annotations_dir}"
        if not self.items:
            raise ValueError(where)

    def num_images(self) -> int:
        return len(self.items)

    def read(self, idx: int, faults: FaultCounter) -> Optional[Objects]:
        """The image's objects (empty ones dropped), or None with its faults counted."""
        item = self.items[idx]
        try:
            obj = getattr(self, f"_read_{self.format}")(*item, faults)
        except SampleFault as f:
            faults.add(f.kind, item[1], item[0], f.message)
            return None
        except Exception as exc:  # noqa: BLE001 - never let one image end the run
            faults.add("sample_error", item[1], item[0], repr(exc))
            return None
        if obj is None:
            return None
        if len(obj.ids) == 0:
            faults.add("no_annotations", item[1], item[0], "no object with a pixel")
            return None
        return obj

    def record(self, idx: int, faults: FaultCounter) -> Optional[Record]:
        obj = self.read(idx, faults)
        return None if obj is None else objects_record(obj)

    def _read_binary_pngs(self, stem, image_path, mask_files, faults) -> Optional[Objects]:
        h, w = image_size(image_path)

        def masks():
            for k, path in mask_files:
                try:
                    m = binary_mask(path)
                except ValueError as exc:
                    faults.add("bad_annotation", path, stem, str(exc))
                    continue
                if m.shape != (h, w):
                    faults.add("bad_annotation", path, stem, f"mask is {m.shape[0]}x{m.shape[1]}, its image {h}x{w}")
                    continue
                ok.append(k)
                yield k, m

        ok: list = []
        ids, counts, _ = encode(masks())
        if not ok:
            return None  # every mask file was a counted fault
        return Objects(stem, image_path, functools.partial(_read_file, image_path), h, w, ids, counts)

    def _read_instance_pngs(self, stem, image_path, mask_path, faults) -> Objects:
        h, w = image_size(image_path)
        try:
            label = label_image(mask_path)
        except ValueError as exc:
            raise SampleFault("bad_annotation", str(exc)) from None
        if label.shape != (h, w):
            raise SampleFault("bad_annotation", f"{mask_path} is {label.shape[0]}x{label.shape[1]}, its image {h}x{w}")
        ids, masks, ignore = split_labels(label, self.ignore_value)
        ids, counts, ignore = encode(zip(ids, masks), ignore)
        return Objects(stem, image_path, functools.partial(_read_file, image_path), h, w, ids, counts, ignore)

    def _read_labelme(self, stem, json_path, faults) -> Optional[Objects]:
        data = labelme.load(json_path)
        image_bytes, image_path = labelme.image(data, json_path, self.images_dir)
        h, w = labelme.image_size(data, image_bytes, image_path)
        ids, counts, labels, bad = labelme.objects(data, h, w)
        for i, message in bad:
            faults.add("bad_annotation", json_path, f"{stem}/shapes[{i}]", message)
        if bad and len(ids) == 0:
            return None  # every shape was a counted fault
        image = image_bytes if image_bytes is not None else functools.partial(_read_file, image_path)
        return Objects(stem, json_path, image, h, w, ids, counts, labels=labels)


class FolderDataModule(StreamDataModule):
    """Image folders with binary mask PNGs, instance-id PNGs or labelme json. Keys: see
    configs/data/binary_pngs.yaml (and instance_pngs, labelme)."""

    def __init__(
        self,
        format: str = "binary_pngs",
        train_images: Optional[str] = None,
        train_annotations: Optional[str] = None,
        train_list: Optional[str] = None,
        val_images: Optional[str] = None,
        val_annotations: Optional[str] = None,
        val_list: Optional[str] = None,
        ignore_value: Optional[int] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if format not in FORMATS:
            raise ValueError(f"data.format={format!r}: expected one of {', '.join(FORMATS)}")
        self.format = format
        self.train_images, self.train_annotations, self.train_list = train_images, train_annotations, train_list
        self.val_images, self.val_annotations, self.val_list = val_images, val_annotations, val_list
        self.ignore_value = None if ignore_value is None else int(ignore_value)

    train_key, val_key = "train_images", "val_images"

    def _stream(self, split: str) -> Optional[FolderStream]:
        images, annotations = getattr(self, f"{split}_images"), getattr(self, f"{split}_annotations")
        list_file = getattr(self, f"{split}_list")
        if self.format == "labelme":
            annotations = annotations or images  # labelme saves the json next to its image
        if not images and not annotations:
            return None
        if not annotations:
            raise ValueError(f"{type(self).__name__}: data.{split}_annotations is not set (the masks of {images})")
        if self.format != "labelme" and not images:
            raise ValueError(f"{type(self).__name__}: data.{split}_images is not set ({annotations} needs its images)")
        for key, d in ((f"{split}_images", images), (f"{split}_annotations", annotations)):
            if d and not os.path.isdir(d):
                raise FileNotFoundError(f"data.{key}: folder {d} does not exist")
        if list_file and not os.path.isfile(list_file):
            raise FileNotFoundError(f"data.{split}_list: list file {list_file} does not exist")
        train = split == "train"
        return FolderStream(
            self.format,
            images,
            annotations,
            list_file,
            self.ignore_value,
            self.cfg,
            **self._stream_kwargs(train),
        )

    def _build_train(self) -> Optional[FolderStream]:
        return self._stream("train")

    def _build_val(self) -> Optional[FolderStream]:
        return self._stream("val")

    def _default_epoch_length(self, world_size: int) -> int:
        return max(1, self.train_dataset.num_images() // (world_size * self.batch_size))
