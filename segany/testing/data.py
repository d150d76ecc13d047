"""Builders of small SA-1B-format data for tests and examples: masks, json, JPEG bytes,
hand-made tar files (so that tests can cut, corrupt and reorder members)."""

from __future__ import annotations

import io
import json
import tarfile

import cv2
import numpy as np

from segany.data.formats.sa1b import annotation, image_json, rle


def rle_string(mask: np.ndarray) -> str:
    return rle(mask)["counts"]


def sa1b_json(image_id: int, masks: list, ids=None, **per_mask) -> dict:
    """SA-1B json of (h, w) bool masks; per_mask: field -> list of values (predicted_iou, ...)."""
    h, w = masks[0].shape
    anns = [
        annotation(ids[j] if ids is not None else image_id * 1000 + j, m, **{k: v[j] for k, v in per_mask.items()})
        for j, m in enumerate(masks)
    ]
    return image_json(image_id, h, w, f"sa_{image_id}.jpg", anns)


def jpeg(image_rgb: np.ndarray, quality: int = 95) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(image_rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def png(image_rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image_rgb[..., ::-1]))
    assert ok
    return buf.tobytes()


def write_tar(path: str, members: list) -> None:
    """members: (name, bytes | dict); dicts are written as json."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            if isinstance(data, dict):
                data = json.dumps(data).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1
            tar.addfile(info, io.BytesIO(data))


def member_offsets(path: str) -> dict:
    """name -> (header offset, data offset, size) of each member of a tar file."""
    with tarfile.open(path) as tar:
        return {m.name: (m.offset, m.offset_data, m.size) for m in tar.getmembers()}
