"""Image folders paired with mask files by file stem: which mask files belong to which image.

  binary_pngs    one binary PNG per object: `<masks>/<stem>_<k>.png`, or `<masks>/<stem>/<k>.png`
                 (one folder per image); k (an integer) is the object's id
  instance_pngs  one instance-id PNG per image: `<masks>/<stem>.png`

`<stem>` is an image's file name without its extension. Images without a mask are left out, and
mask files that belong to no image are named in one warning; both at setup.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Optional

log = logging.getLogger("segany.data")

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_EXTS = (".png", ".bmp", ".tif", ".tiff")
_OBJECT = re.compile(r"^(.+)_(\d+)$")  # <stem>_<k>
_K = re.compile(r"^(\d+)$")


def _files(folder: str, exts: tuple) -> list:
    return sorted(
        n
        for n in os.listdir(folder)
        if not n.startswith(".") and n.lower().endswith(exts) and os.path.isfile(os.path.join(folder, n))
    )


def images_by_stem(folder: str) -> dict:
    """stem -> image file name, for the images of folder."""
    out: dict = {}
    for name in _files(folder, IMAGE_EXTS):
        stem = os.path.splitext(name)[0]
        if stem in out:
            raise ValueError(f"{folder}: two images of stem {stem!r}: {out[stem]} and {name}")
        out[stem] = name
    return out


def select(stems: dict, list_file: Optional[str], folder: str) -> list:
    """The stems to read: those of list_file (a text file of stems, one a line; from formats/ritm.py's
    read_list), else all, sorted. A listed stem not in `stems` is an error naming it."""
    if not list_file:
        return sorted(stems)
    from segany.data.formats.ritm import read_list

    wanted = list(dict.fromkeys(os.path.splitext(n)[0] for n, _ in read_list(list_file)))
    missing = [n for n in wanted if n not in stems]
    if missing:
        raise FileNotFoundError(f"{list_file}: {len(missing)} listed images not in {folder}: {missing[:3]}")
    return wanted


def _warn_orphans(masks_dir: str, orphans: list) -> None:
    if orphans:
        log.warning("%s: %d mask files belong to no image and are not read: %s", masks_dir, len(orphans), orphans[:3])


def binary_png_objects(masks_dir: str, stems) -> dict:
    """stem -> [(k, mask path)] sorted by k, in either layout (both may be mixed)."""
    stems = set(stems)
    out: dict = {}
    orphans = []
    for name in sorted(os.listdir(masks_dir)):
        path = os.path.join(masks_dir, name)
        if os.path.isdir(path):
            if name not in stems:
                orphans.append(name + "/")
                continue
            for f in _files(path, MASK_EXTS):
                m = _K.match(os.path.splitext(f)[0])
                if m:
                    out.setdefault(name, []).append((int(m.group(1)), os.path.join(path, f)))
                else:
                    orphans.append(f"{name}/{f}")
        elif name.lower().endswith(MASK_EXTS) and not name.startswith("."):
            m = _OBJECT.match(os.path.splitext(name)[0])
            if m and m.group(1) in stems:
                out.setdefault(m.group(1), []).append((int(m.group(2)), path))
            else:
                orphans.append(name)
    _warn_orphans(masks_dir, orphans)
    for stem, objs in out.items():
        objs.sort()
        ks = [k for k, _ in objs]
        if len(set(ks)) < len(ks):
            raise ValueError(f"{masks_dir}: image {stem!r} has two mask files of the same object number: {objs}")
    return out


def instance_png_files(masks_dir: str, stems) -> dict:
    """stem -> its instance-id PNG path."""
    stems = set(stems)
    out, orphans = {}, []
    for name in _files(masks_dir, MASK_EXTS):
        stem = os.path.splitext(name)[0]
        if stem in stems:
            out[stem] = os.path.join(masks_dir, name)
        else:
            orphans.append(name)
    _warn_orphans(masks_dir, orphans)
    return out


def labelme_files(folder: str) -> dict:
    """stem -> labelme json path, for the .json files of folder."""
    return {os.path.splitext(n)[0]: os.path.join(folder, n) for n in _files(folder, (".json",))}
