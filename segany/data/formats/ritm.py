"""The mask conventions of the interactive-segmentation benchmarks as RITM reads them
(SamsungLabs/ritm_interactive_segmentation, isegm/data/datasets/*.py): one mask file per image ->
its objects and its ignore region.

mask_format:
  binary     DAVIS, COCO-MVal: the colour image's maximum over channels > 0 is the one object
             (palette PNGs are read as colours, as cv2.imread does).
  grabcut    GrabCut, Berkeley: first channel; 128 = ignore band, > 128 = the object (RITM sets
             128 -> -1 and > 128 -> 1, then takes the pixels equal to 1, so a stored 1 is object too).
  instances  PascalVOC SegmentationObject (and any instance-id PNG): the colour image converted to
             grey (cv2 BGR2GRAY, as RITM does, so VOC's palette ids become grey levels and its
             border colour 220); ignore_value = ignore region; every other non-zero value is an object.
  sbd        SBD inst/*.mat: GTinst.Segmentation, every non-zero id is an object (scipy loadmat).

The restricted unpickler reads RITM's list files (PascalVOC test.pickle: (names, instance ids))
without running code from them: only lists, tuples, strings and (numpy) integers are allowed.
Mask files are decoded by formats/masks.py (shared with the image-folder formats).
"""

from __future__ import annotations

import pickle
from typing import Optional

import cv2
import numpy as np

from segany.data.formats.masks import binary_mask, imread, split_labels

MASK_FORMATS = ("binary", "grabcut", "instances", "sbd")


def read_objects(path: str, mask_format: str, ignore_value: Optional[int] = None) -> tuple:
    """A mask file -> (ids (A,) int64, masks: A (H, W) bool, ignore (H, W) bool), the objects in
    ascending id order (masks an iterable: made one at a time for instance files)."""
    if mask_format == "binary":
        m = binary_mask(path)
        return np.array([1], np.int64), [m], np.zeros(m.shape, bool)
    if mask_format == "grabcut":
        m = imread(path)[:, :, 0]
        return np.array([1], np.int64), [(m > 128) | (m == 1)], m == 128
    if mask_format == "sbd":
        return split_labels(_read_sbd(path), ignore_value)
    if mask_format == "instances":
        return split_labels(cv2.cvtColor(imread(path), cv2.COLOR_BGR2GRAY).astype(np.int64), ignore_value)
    raise ValueError(f"mask_format={mask_format!r}: expected one of {', '.join(MASK_FORMATS)}")


def _read_sbd(path: str) -> np.ndarray:
    from scipy.io import loadmat

    try:
        return loadmat(path)["GTinst"][0][0][0].astype(np.int64)
    except (KeyError, IndexError, ValueError, OSError) as exc:
        raise ValueError(f"{path}: not an SBD instance file (GTinst.Segmentation): {exc}") from None


class _ListUnpickler(pickle.Unpickler):
    _ALLOWED = {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a list file")


def read_list(path: str) -> list:
    """A sample list -> [(name, instance id or None)]: a text file of names (one a line: SBD val.txt,
    VOC val.txt), or RITM's pickle of (names, instance ids) (PascalVOC test.pickle)."""
    try:
        if path.endswith((".pickle", ".pkl")):
            with open(path, "rb") as f:
                data = _ListUnpickler(f).load()
            if isinstance(data, (tuple, list)) and len(data) == 2 and len(data[0]) == len(data[1]):
                return [(str(n), int(i)) for n, i in zip(*data)]
            if isinstance(data, list) and all(isinstance(d, (tuple, list)) and len(d) == 2 for d in data):
                return [(str(n), int(i)) for n, i in data]  # SBD's <split>_images_and_ids_list.pkl
            raise ValueError("expected (names, instance ids) or [(name, instance id), ...]")
        with open(path) as f:
            return [(line.strip(), None) for line in f if line.strip()]
    except (OSError, pickle.UnpicklingError, ValueError, TypeError, EOFError) as exc:
        raise ValueError(f"list file {path}: {exc}") from None
