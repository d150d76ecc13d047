"""Synthetic SA-1B-format data: random scenes of overlapping shapes with exact masks.

Each scene: a dark, desaturated, smoothly textured background and 3-8 objects (ellipses,
rotated rectangles, star-shaped polygons), each in its own saturated hue with its own
texture (flat, stripes, checker, smooth noise), painted in order so later objects occlude
earlier ones. A share `thin_small_frac` of the objects are instead thin or small: a "line"
(a quadratic Bezier curve 1-4 px wide and 0.3-0.8 image sides long) or a "small" blob (an
ellipse with diameters 4-16 px), half and half. The masks are the visible parts, exact to
the pixel; scenes are drawn from (seed, image id) alone, so any subset regenerates
identically. The thin/small draws come from their own stream (`rng.spawn`), so that
``thin_small_frac=0, min_visible=24`` gives the scenes of GENERATOR_VERSION 1 bit for bit.
The datamodule (`segany.data.datamodules.synthetic`) writes them as shards when they are
missing or were made by other settings.
"""

from __future__ import annotations

import colorsys
from typing import Iterator

import cv2
import numpy as np

from segany.data.formats.sa1b import annotation, image_json

GENERATOR_VERSION = 2  # 1: large shapes only, MIN_VISIBLE 24; 2: thin and small objects
SHAPES = ("ellipse", "rectangle", "polygon")
THIN_SMALL = ("line", "small")
TEXTURES = ("flat", "stripes", "checker", "noise")
MIN_VISIBLE = 10  # pixels: smaller visible parts get no annotation (a 4 px disc has 12)


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


def _line(rng, h, w, width_range) -> np.ndarray:
    """A quadratic Bezier curve: the pixels whose centre lies within width / 2 of it."""
    side = min(h, w)
    p0 = np.array([rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h])
    length, angle = rng.uniform(0.3, 0.8) * side, rng.uniform(0, 2 * np.pi)
    p2 = p0 + length * np.array([np.cos(angle), np.sin(angle)])
    bend = rng.uniform(-0.3, 0.3) * length * np.array([-np.sin(angle), np.cos(angle)])
    p1 = (p0 + p2) / 2 + bend
    t = np.linspace(0, 1, 33)[:, None]
    curve = (1 - t) ** 2 * p0 + 2 * t * (1 - t) * p1 + t**2 * p2  # (33, 2) x, y
    half = rng.uniform(*width_range) / 2
    band = np.zeros((h, w), np.uint8)  # candidate pixels: a thicker rasterised curve
    cv2.polylines(band, [np.round(curve).astype(np.int32)], False, 1, thickness=int(2 * half) + 3)
    ys, xs = np.nonzero(band)
    p = np.stack([xs, ys], 1).astype(np.float32)[:, None]  # (P, 1, 2) pixel centres
    a, d = curve[:-1].astype(np.float32), np.diff(curve, axis=0).astype(np.float32)  # (32, 2) segments
    s = np.clip(((p - a) * d).sum(-1) / np.maximum((d * d).sum(-1), 1e-9), 0, 1)  # (P, 32)
    dist = np.linalg.norm(p - a - s[..., None] * d, axis=-1).min(1)  # (P,) distance to the curve
    canvas = np.zeros((h, w), bool)
    canvas[ys, xs] = dist <= half
    return canvas


def _small(rng, h, w, diameter_range) -> np.ndarray:
    """A rotated ellipse with both diameters in diameter_range (pixel centres inside it)."""
    cx, cy = rng.uniform(0.05, 0.95) * w, rng.uniform(0.05, 0.95) * h
    a, b = rng.uniform(*diameter_range, 2) / 2
    theta = rng.uniform(0, np.pi)
    r = int(max(a, b)) + 2  # a window around the centre holds the ellipse
    x0, y0 = max(int(cx) - r, 0), max(int(cy) - r, 0)
    yy, xx = np.mgrid[y0 : min(int(cy) + r, h), x0 : min(int(cx) + r, w)].astype(np.float32)
    u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
    canvas = np.zeros((h, w), bool)
    canvas[y0 : y0 + yy.shape[0], x0 : x0 + yy.shape[1]] = (u / a) ** 2 + (v / b) ** 2 <= 1
    return canvas


def mask_width(mask: np.ndarray) -> float:
    """Width of a mask in its narrowest place: the diameter of the largest inscribed disc,
    2 * (largest distance to a background pixel) - 1 (1 for a 1 px line, d for a d px wide
    band, d - 1 to d - 2 for a disc of diameter d, whose centre lies between pixel centres)."""
    padded = np.pad(mask.astype(np.uint8), 1)
    return 2 * float(cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE).max()) - 1


def _rgb(h, s, v) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h, s, v), np.float32) * 255


def make_scene(
    rng: np.random.Generator,
    height: int,
    width: int,
    n_objects: int,
    textures=TEXTURES,
    shapes=SHAPES,
    thin_small_frac: float = 0.0,
    line_width=(1.0, 4.0),
    small_diameter=(4.0, 16.0),
    min_visible: int = MIN_VISIBLE,
) -> tuple[np.ndarray, list]:
    """(height, width, 3) uint8 RGB image and the visible mask (bool) of each object, in
    painting order (objects hidden below min_visible pixels are dropped). Each object is a
    line or a small blob (THIN_SMALL, equally likely) with probability thin_small_frac."""
    h, w = height, width
    thin = rng.spawn(1)[0]  # its own stream: the draws of `rng` stay those of version 1
    bg = _rgb(rng.random(), rng.uniform(0, 0.3), rng.uniform(0.2, 0.45))
    image = bg * (0.75 + 0.5 * _smooth_noise(rng, h, w, int(rng.integers(2, 6))))[..., None]
    hues = (rng.random() + np.arange(n_objects) / n_objects) % 1.0
    rng.shuffle(hues)
    shapes_ = [_shape(rng, h, w, shapes[int(rng.integers(len(shapes)))]) for _ in range(n_objects)]
    for i in range(n_objects):  # replace a share by thin / small objects
        if thin_small_frac > 0 and thin.random() < thin_small_frac:
            line = thin.random() < 0.5
            shapes_[i] = _line(thin, h, w, line_width) if line else _small(thin, h, w, small_diameter)
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
    return image, [v for v in reversed(visible) if v.sum() >= min_visible]


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
    num: int,
    seed: int = 0,
    first_id: int = 0,
    min_side: int = 192,
    max_side: int = 320,
    objects=(3, 8),
    thin_small_frac: float = 0.3,
    line_width=(1.0, 4.0),
    small_diameter=(4.0, 16.0),
    min_visible: int = MIN_VISIBLE,
) -> Iterator[tuple[str, str, bytes, dict]]:
    """(key, 'jpg', JPEG bytes, SA-1B json) of scenes first_id .. first_id + num - 1; image
    sides in [min_side, max_side], [objects[0], objects[1]] objects each (see make_scene)."""
    for image_id in range(first_id, first_id + num):
        rng = np.random.default_rng([seed, image_id])
        h, w = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
        n = int(rng.integers(objects[0], objects[1] + 1))
        image, masks = make_scene(
            rng,
            h,
            w,
            n,
            thin_small_frac=thin_small_frac,
            line_width=line_width,
            small_diameter=small_diameter,
            min_visible=min_visible,
        )
        ok, jpg = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
        assert ok
        key = f"sa_{image_id}"
        meta = image_json(image_id, h, w, f"{key}.jpg", scene_annotations(rng, masks, image_id))
        yield key, "jpg", jpg.tobytes(), meta
