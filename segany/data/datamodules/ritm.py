"""Interactive-segmentation benchmarks in RITM's layout (GrabCut, Berkeley, DAVIS, SBD, PascalVOC,
COCO-MVal): an image folder and a mask folder under `root`, paired by file stem, with the mask
conventions of formats/ritm.py. Evaluation only (a validation split).

Each image is a Record whose annotations are its objects (ids = their mask values; compressed RLE)
plus, when the image has one, its ignore region as one more annotation with iscrowd=True and id 0:
the points task leaves it out like a COCO crowd region (include_crowd=false), the noc task reads it
as the region its IoU and clicks exclude.

Files: images are `images_dir/*.*` sorted by name (RITM's order); the mask of `a.jpg` is the file of
stem `a` in masks_dir (any extension; RITM pairs by the name before its first dot). With list_file
(a path relative to root, or absolute), the samples are the list's names, and, for a list of
(name, instance id) pairs (PascalVOC test.pickle), only those instances.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import OrderedDict
from typing import Optional

from segany.data.datamodules.base import StreamDataModule
from segany.data.datamodules.coco import _read_file
from segany.data.datamodules.folder import Objects, encode, objects_record
from segany.data.faults import FaultCounter
from segany.data.formats.ritm import MASK_FORMATS, read_list, read_objects
from segany.data.sample import Record, SampleConfig
from segany.data.streams.indexed import IndexedStream

log = logging.getLogger("segany.data")


def _by_stem(folder: str, first_dot: bool) -> dict:
    """stem -> file name, for the files of folder."""
    names = sorted(n for n in os.listdir(folder) if not n.startswith(".") and "." in n)
    return {(n.split(".")[0] if first_dot else os.path.splitext(n)[0]): n for n in names}


class RitmStream(IndexedStream):
    def __init__(
        self,
        root: str,
        images_dir: str,
        masks_dir: str,
        mask_format: str,
        ignore_value: Optional[int],
        list_file: Optional[str],
        cfg: SampleConfig,
        **kw,
    ):
        super().__init__(cfg, train=False, **kw)
        self.images_dir, self.masks_dir = os.path.join(root, images_dir), os.path.join(root, masks_dir)
        for key, d in (("images_dir", self.images_dir), ("masks_dir", self.masks_dir)):
            if not os.path.isdir(d):
                raise FileNotFoundError(f"data.{key}: folder {d} does not exist")
        self.mask_format, self.ignore_value = mask_format, ignore_value
        images = _by_stem(self.images_dir, first_dot=True)
        masks = _by_stem(self.masks_dir, first_dot=False)
        if list_file:
            path = list_file if os.path.isabs(list_file) else os.path.join(root, list_file)
            wanted: OrderedDict = OrderedDict()
            for name, inst in read_list(path):
                wanted.setdefault(name, [])
                if inst is not None:
                    wanted[name].append(inst)
            missing = [n for n in wanted if n not in images]
            if missing:
                raise FileNotFoundError(f"{path}: {len(missing)} listed images not in {self.images_dir}: {missing[:3]}")
        else:
            wanted = OrderedDict((stem, []) for stem in images)
        missing = [n for n in wanted if n not in masks]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} images have no mask of the same stem in {self.masks_dir}: "
                f"{[images[n] for n in missing[:3]]}"
            )
        # (image file, mask file, instance ids to keep or None for all)
        self.samples = [(images[n], masks[n], ids or None) for n, ids in wanted.items()]
        if not self.samples:
            raise ValueError(f"{self.images_dir}: no images")

    def num_images(self) -> int:
        return len(self.samples)

    def record(self, idx: int, faults: FaultCounter) -> Optional[Record]:
        image_name, mask_name, keep = self.samples[idx]
        image_path, mask_path = os.path.join(self.images_dir, image_name), os.path.join(self.masks_dir, mask_name)
        try:
            ids, masks, ignore = read_objects(mask_path, self.mask_format, self.ignore_value)
            ignore_shape = ignore.shape
        except ValueError as exc:
            faults.add("bad_annotation", mask_path, image_name, str(exc))
            return None
        if keep is not None:
            absent = sorted(set(keep) - set(ids.tolist()))
            if absent:
                raise ValueError(f"{mask_path}: listed instance ids {absent} are not in the mask")
        ids, counts, ignore = encode(((k, m) for k, m in zip(ids, masks) if keep is None or k in keep), ignore)
        if len(ids) == 0:  # RITM drops objects of area 0
            faults.add("no_annotations", mask_path, image_name, "no object in the mask")
            return None
        h, w = ignore_shape
        key = image_name.split(".")[0]
        loader = functools.partial(_read_file, image_path)
        return objects_record(Objects(key, image_path, loader, h, w, ids, counts, ignore))


class RitmDataModule(StreamDataModule):
    """An interactive-segmentation benchmark in RITM's layout (evaluation only). Keys: see
    configs/data/davis.yaml (and grabcut, berkeley, sbd, pascalvoc, coco_mval)."""

    def __init__(
        self,
        root: Optional[str] = None,
        images_dir: str = "img",
        masks_dir: str = "gt",
        mask_format: str = "binary",
        ignore_value: Optional[int] = None,
        list_file: Optional[str] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if mask_format not in MASK_FORMATS:
            raise ValueError(f"data.mask_format={mask_format!r}: expected one of {', '.join(MASK_FORMATS)}")
        self.root, self.images_dir, self.masks_dir = root, images_dir, masks_dir
        self.mask_format, self.list_file = mask_format, list_file
        self.ignore_value = None if ignore_value is None else int(ignore_value)

    train_key, val_key = "root", "root"

    def _build_train(self) -> None:
        return None  # benchmarks only

    def _build_val(self) -> Optional[RitmStream]:
        if not self.root:
            return None
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"data.root: folder {self.root} does not exist")
        return RitmStream(
            self.root,
            self.images_dir,
            self.masks_dir,
            self.mask_format,
            self.ignore_value,
            self.list_file,
            self.cfg,
            batch_size=self.val_batch_size,
            seed=self.seed,
            max_fault_warnings=self.max_fault_warnings,
        )
