"""Synthetic SA-1B-format data: random scenes of overlapping shapes with exact masks.

Each scene: a dark, desaturated, smoothly textured background and 3-8 objects (ellipses,
rotated rectangles, star-shaped polygons), each in its own saturated hue with its own
texture (flat, stripes, checker, smooth noise), painted in order so later objects occlude
earlier ones. The masks are the visible parts, exact to the pixel; scenes are drawn from
(seed, image id) alone, so any subset regenerates identically. The datamodule
(`segany.data.datamodules.synthetic`) writes them as shards when they are missing.
"""

from __future__ import annotations

import colorsys
from typing import Iterator

import cv2
import numpy as np

from segany.data.formats.sa1b import annotation, image_json

SHAPES = ("ellipse", "rectangle", "polygon")
TEXTURES = ("flat", "stripes", "checker", "noise")
MIN_VISIBLE = 24  # pixels: smaller visible parts get no annotation


def _smooth_noise(rng, h, w, cells) -> np.ndarray:
    """(h, w) float32 in [0, 1], smooth at the scale of h / cells."""
    grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
    return np.clip(cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC), 0, 1)


def _texture(rng, h, w, kind) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "flat":
        return np.full((h, w), 0.8, np.float32)
    if kind == "stripes":
        theta, period = rng.uniform(0, np.pi), rng.uniform(6, 16)
        return 0.6 + 0.4 * (np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period) > 0)
    if kind == "checker":
        c = int(rng.integers(5, 12))
        return 0.6 + 0.4 * (((xx // c) + (yy // c)) % 2)
    return 0.55 + 0.45 * _smooth_noise(rng, h, w, int(rng.integers(4, 9)))


def _shape(rng, h, w, kind) -> np.ndarray:
    canvas = np.zeros((h, w), np.uint8)
    side = min(h, w)
    cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
    if kind == "ellipse":
        axes = (int(rng.uniform(0.08, 0.3) * side), int(rng.uniform(0.08, 0.3) * side))
        cv2.ellipse(canvas, (int(cx), int(cy)), axes, rng.uniform(0, 180), 0, 360, 1, -1)
    elif kind == "rectangle":
        size = (rng.uniform(0.15, 0.55) * side, rng.uniform(0.15, 0.55) * side)
        box = cv2.boxPoints(((cx, cy), size, rng.uniform(0, 90)))
        cv2.fillPoly(canvas, [np.round(box).astype(np.int32)], 1)
    else:
        k = int(rng.integers(5, 10))
        angles = np.sort(rng.uniform(0, 2 * np.pi, k))
        radius = rng.uniform(0.12, 0.3) * side * rng.uniform(0.5, 1.0, k)
        pts = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], 1)
        cv2.fillPoly(canvas, [np.round(pts).astype(np.int32)], 1)
    return canvas.astype(bool)


def _rgb(h, s, v) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h, s, v), np.float32) * 255


def make_scene(
    rng: np.random.Generator, height: int, width: int, n_objects: int, textures=TEXTURES, shapes=SHAPES
) -> tuple[np.ndarray, list]:
    """(height, width, 3) uint8 RGB image and the visible mask (bool) of each object, in
    painting order (objects hidden below MIN_VISIBLE pixels are dropped)."""
    h, w = height, width
    bg = _rgb(rng.random(), rng.uniform(0, 0.3), rng.uniform(0.2, 0.45))
    image = bg * (0.75 + 0.5 * _smooth_noise(rng, h, w, int(rng.integers(2, 6))))[..., None]
    hues = (rng.random() + np.arange(n_objects) / n_objects) % 1.0
    rng.shuffle(hues)
    shapes_ = [_shape(rng, h, w, shapes[int(rng.integers(len(shapes)))]) for _ in range(n_objects)]
    for i, m in enumerate(shapes_):
        colour = _rgb(hues[i], rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0))
        kind = textures[int(rng.integers(len(textures)))]
        ys, xs = np.nonzero(m)
        if len(ys) == 0:
            continue
        y0, x0 = ys.min(), xs.min()
        box = (slice(y0, ys.max() + 1), slice(x0, xs.max() + 1))  # texture over the bbox only
        tex = _texture(rng, box[0].stop - y0, box[1].stop - x0, kind)
        region = image[box]
        region[m[box]] = colour * tex[m[box]][:, None]
    image = np.clip(image + rng.normal(0, 2.0, image.shape), 0, 255).astype(np.uint8)
    visible, cover = [], np.zeros((h, w), bool)
    for m in reversed(shapes_):
        visible.append(m & ~cover)
        cover |= m
    return image, [v for v in reversed(visible) if v.sum() >= MIN_VISIBLE]


def scene_annotations(rng, masks: list, image_id: int) -> list:
    """SA-1B annotation dicts of the masks (ids image_id * 1000 + j)."""
    if not masks:
        return []
    h, w = masks[0].shape
    anns = []
    for j, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        p = int(rng.integers(len(xs)))
        anns.append(
            annotation(
                image_id * 1000 + j,
                m,
                predicted_iou=rng.uniform(0.8, 1.0),
                stability_score=rng.uniform(0.85, 1.0),
                crop_box=[0, 0, w, h],
                point_coords=[[xs[p], ys[p]]],
            )
        )
    return anns


def scene_samples(
    num: int, seed: int = 0, first_id: int = 0, min_side: int = 192, max_side: int = 320
) -> Iterator[tuple[str, str, bytes, dict]]:
    """(key, 'jpg', JPEG bytes, SA-1B json) of scenes first_id .. first_id + num - 1."""
    for image_id in range(first_id, first_id + num):
        rng = np.random.default_rng([seed, image_id])
        h, w = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
        image, masks = make_scene(rng, h, w, int(rng.integers(3, 9)))
        ok, jpg = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
        assert ok
        key = f"sa_{image_id}"
        meta = image_json(image_id, h, w, f"{key}.jpg", scene_annotations(rng, masks, image_id))
        yield key, "jpg", jpg.tobytes(), meta
