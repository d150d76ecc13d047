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
"""

from __future__ import annotations

import pickle
from typing import Optional

import cv2
import numpy as np

MASK_FORMATS = ("binary", "grabcut", "instances", "sbd")


def _imread(path: str) -> np.ndarray:
    img = cv2.imread(path)  # (H, W, 3) BGR, palette expanded: as RITM reads masks
    if img is None:
        raise ValueError(f"{path}: mask does not decode")
    return img


def read_objects(path: str, mask_format: str, ignore_value: Optional[int] = None) -> tuple:
    """A mask file -> (ids (A,) int64, masks (A, H, W) bool, ignore (H, W) bool), the objects in
    ascending id order."""
    if mask_format == "binary":
        m = _imread(path).max(axis=2)
        ids, masks, ignore = [1], [m > 0], np.zeros(m.shape, bool)
    elif mask_format == "grabcut":
        m = _imread(path)[:, :, 0]
        ignore = m == 128
        ids, masks = [1], [(m > 128) | (m == 1)]
    elif mask_format in ("instances", "sbd"):
        if mask_format == "sbd":
            m = _read_sbd(path)
        else:
            m = cv2.cvtColor(_imread(path), cv2.COLOR_BGR2GRAY).astype(np.int64)
        ignore = m == ignore_value if ignore_value is not None else np.zeros(m.shape, bool)
        ids = [int(v) for v in np.unique(m) if v != 0 and v != ignore_value]
        masks = [m == v for v in ids]
    else:
        raise ValueError(f"mask_format={mask_format!r}: expected one of {', '.join(MASK_FORMATS)}")
    h, w = ignore.shape
    return np.array(ids, np.int64), np.array(masks, bool).reshape(len(ids), h, w), ignore


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
