"""The one sample format of every datamodule, and the collate that batches it.

A `Record` is what a source (SA-1B shard, COCO json) knows about one image: encoded
image bytes and its masks as compressed COCO RLE strings. `make_sample` filters the
masks, samples at most `max_masks`, decodes only those (directly at the output size),
and returns tensors; `collate` pads the mask dimension across the batch. The batch keys
are fixed by docs/contracts.md:

    image          (B, 3, S, S) float32   normalised (PIXEL_MEAN/STD, RGB), zero-padded
    original_size  (B, 2) long            (h, w) as stored
    input_size     (B, 2) long            (h, w) of the content after resize (and crop)
    masks          (B, N, S, S) bool      N = most masks of any image in the batch
    masks_lowres   (B, N, S/4, S/4) bool  only with lowres_targets
    valid          (B, N) bool            False on padding rows
    boxes          (B, N, 4) float32      x0, y0, x1, y1 in the input frame, inclusive pixel
                                          indices (as segment_anything's batched_mask_to_box)
    mask_ids       (B, N) long            annotation ids, -1 on padding
    clip           (B, N, D) float32      CLIP crop embedding of each mask (text prompt; only when
                                          the source has CLIP sidecars: data.clip_sidecar), 0 where absent
    has_clip       (B, N) bool            the mask has a CLIP embedding (False on padding)
    image_id       list[str]              sample key
    faults         dict[str, int]         samples skipped since this worker's previous batch
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from segany.data.decode import decode_image
from segany.data.faults import SampleFault
from segany.data.formats import rle
from segany.data.transforms import flip_boxes, lowres, normalize_pad, place_masks, plan, warp_image


@dataclass
class SampleConfig:
    img_size: int = 1024  # S: longest side after resize, padded square size
    max_masks: int = 64  # masks sampled per image (paper: 64)
    lowres_targets: bool = False  # also return masks_lowres (S/4)
    max_area_frac: float = 0.9  # paper: drop masks covering > 90% of the image
    min_area: int = 0  # drop masks smaller than this (pixels, original size)
    min_predicted_iou: float = 0.0  # SA-1B predicted_iou threshold (0: off)
    min_stability_score: float = 0.0  # SA-1B stability_score threshold (0: off)
    include_crowd: bool = False  # keep iscrowd=1 regions (COCO) as masks
    jitter: Optional[Sequence[float]] = None  # large-scale jitter scale range, e.g. (0.1, 2.0)
    flip: float = 0.0  # horizontal flip probability
    fast_jpeg: bool = True  # decode JPEGs at 1/2..1/8 scale when that is still >= output

    def __post_init__(self):
        if self.img_size % 16:
            raise ValueError(f"img_size must be a multiple of 16, got {self.img_size}")
        if self.max_masks < 1:
            raise ValueError(f"max_masks must be >= 1, got {self.max_masks}")
        if self.jitter is not None:
            self.jitter = (float(self.jitter[0]), float(self.jitter[1]))
            if not 0 < self.jitter[0] <= self.jitter[1]:
                raise ValueError(f"jitter must be (min, max) with 0 < min <= max, got {self.jitter}")
        self.flip = float(self.flip)


@dataclass
class Record:
    key: str
    source: str  # shard url or file, for messages
    image: Union[bytes, Callable[[], bytes]]  # encoded image, or a loader of it
    height: int
    width: int
    counts: list  # (A,) compressed RLE strings
    ids: np.ndarray  # (A,) int64
    predicted_iou: np.ndarray = None  # (A,) float, nan where absent
    stability_score: np.ndarray = None  # (A,) float, nan where absent
    iscrowd: np.ndarray = None  # (A,) bool
    clip: Optional[np.ndarray] = None  # (A, D) float32 CLIP crop embeddings, NaN rows where absent

    def __post_init__(self):
        a = len(self.counts)
        nan = np.full(a, np.nan)
        self.predicted_iou = nan if self.predicted_iou is None else np.asarray(self.predicted_iou, float)
        self.stability_score = nan if self.stability_score is None else np.asarray(self.stability_score, float)
        self.iscrowd = np.zeros(a, bool) if self.iscrowd is None else np.asarray(self.iscrowd, bool)
        self.ids = np.asarray(self.ids, np.int64)


def candidate_masks(rec: Record, cfg: SampleConfig) -> tuple[rle.ParsedRLE, np.ndarray]:
    """Parse and check every RLE of the record; indices of the masks that pass the filters."""
    parsed = rle.parse(rec.counts, [rec.height] * len(rec.counts), [rec.width] * len(rec.counts))
    if not parsed.valid.all():
        bad = int(np.flatnonzero(~parsed.valid)[0])
        raise SampleFault(
            "bad_json",
            f"annotation {rec.ids[bad]} (#{bad}): invalid RLE (counts do not "
            f"decode to {rec.height}x{rec.width} pixels)",
        )
    keep = (parsed.area > 0) & (parsed.area <= cfg.max_area_frac * rec.height * rec.width)
    keep &= parsed.area >= cfg.min_area
    if cfg.min_predicted_iou > 0:
        keep &= rec.predicted_iou >= cfg.min_predicted_iou  # nan (absent) fails
    if cfg.min_stability_score > 0:
        keep &= rec.stability_score >= cfg.min_stability_score
    if not cfg.include_crowd:
        keep &= ~rec.iscrowd
    return parsed, np.flatnonzero(keep)


def make_sample(rec: Record, cfg: SampleConfig, rng: np.random.Generator) -> dict:
    """Record -> one sample (tensors, no batch dim). Raises SampleFault for unusable records."""
    parsed, cand = candidate_masks(rec, cfg)
    if len(cand) == 0:
        raise SampleFault("empty_after_filter", f"none of {len(rec.counts)} masks passes the filters")
    if len(cand) > cfg.max_masks:
        cand = np.sort(rng.choice(cand, cfg.max_masks, replace=False))
    geom = plan(rec.height, rec.width, cfg.img_size, rng, cfg.jitter, cfg.flip)
    data = rec.image() if callable(rec.image) else rec.image
    need = (geom.nh, geom.nw) if cfg.fast_jpeg else None
    img = decode_image(data, bgr=True, size=(rec.height, rec.width), need=need)
    rs = rle.resample(parsed, cand, rec.height, rec.width, geom.rows, geom.cols)
    kept = np.flatnonzero(rs.area > 0)
    if len(kept) == 0 and cfg.jitter is not None:  # the crop lost every mask: use the whole image
        geom = plan(rec.height, rec.width, cfg.img_size, rng, None, cfg.flip)
        rs = rle.resample(parsed, cand, rec.height, rec.width, geom.rows, geom.cols)
        kept = np.flatnonzero(rs.area > 0)
    if len(kept) == 0:
        raise SampleFault("empty_after_filter", f"all {len(cand)} sampled masks vanish at {geom.ch}x{geom.cw}")
    masks = place_masks(rs.paint(kept), geom)  # (n, S, S) bool
    sample = {
        "image": torch.from_numpy(normalize_pad(warp_image(img, geom), cfg.img_size)),
        "original_size": torch.tensor([rec.height, rec.width], dtype=torch.long),
        "input_size": torch.tensor([geom.ch, geom.cw], dtype=torch.long),
        "masks": torch.from_numpy(masks),
        "boxes": torch.from_numpy(flip_boxes(rs.boxes[kept], geom).astype(np.float32)),
        "mask_ids": torch.from_numpy(rec.ids[cand[kept]]),
        "image_id": rec.key,
    }
    if rec.clip is not None:
        emb = rec.clip[cand[kept]]  # (n, D), NaN rows: no embedding
        has = ~np.isnan(emb).any(axis=1)
        sample["clip"] = torch.from_numpy(np.where(has[:, None], emb, 0.0).astype(np.float32))
        sample["has_clip"] = torch.from_numpy(has)
    if cfg.lowres_targets:
        sample["masks_lowres"] = torch.from_numpy(lowres(masks, geom))
    return sample


def _stack_padded(parts: list, n: int, fill) -> torch.Tensor:
    """[(k_i, *rest)] -> (B, n, *rest), rows k_i.. filled with `fill`.

    Written out, not torch.nn.utils.rnn.pad_sequence: that fills the whole batch in one op,
    which runs on OpenMP threads once large enough, and a process forked afterwards without
    torch.set_num_threads(1) (the two-rank test in tests/test_data_resume.py) then hangs in
    libgomp. Per-sample slice writes keep the batch building as it was."""
    out = parts[0].new_empty((len(parts), n, *parts[0].shape[1:]))
    for i, p in enumerate(parts):
        out[i, : p.shape[0]] = p
        out[i, p.shape[0] :] = fill
    return out


def collate(samples: list) -> dict:
    """Stack samples, padding the mask dimension to the largest count in the batch."""
    n = max(s["masks"].shape[0] for s in samples)
    counts = torch.tensor([s["masks"].shape[0] for s in samples])
    batch = {
        "image": torch.stack([s["image"] for s in samples]),
        "original_size": torch.stack([s["original_size"] for s in samples]),
        "input_size": torch.stack([s["input_size"] for s in samples]),
        "masks": _stack_padded([s["masks"] for s in samples], n, False),
        "valid": torch.arange(n)[None, :] < counts[:, None],
        "boxes": _stack_padded([s["boxes"] for s in samples], n, 0.0),
        "mask_ids": _stack_padded([s["mask_ids"] for s in samples], n, -1),
        "image_id": [s["image_id"] for s in samples],
    }
    if "masks_lowres" in samples[0]:
        batch["masks_lowres"] = _stack_padded([s["masks_lowres"] for s in samples], n, False)
    with_clip = [s for s in samples if "clip" in s]
    if with_clip:  # samples of a shard without a sidecar: no embedding for any of their masks
        d = with_clip[0]["clip"].shape[1]
        clip = [s.get("clip", torch.zeros(s["masks"].shape[0], d)) for s in samples]
        has = [s.get("has_clip", torch.zeros(s["masks"].shape[0], dtype=torch.bool)) for s in samples]
        batch["clip"] = _stack_padded(clip, n, 0.0)
        batch["has_clip"] = _stack_padded(has, n, False)
    faults: dict = {}
    for s in samples:
        for kind, count in s.get("faults", {}).items():
            faults[kind] = faults.get(kind, 0) + count
    batch["faults"] = faults
    return batch
