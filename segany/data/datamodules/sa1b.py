"""SA-1B as published: tar shards of `sa_<id>.jpg` + `sa_<id>.json`, streamed.

Training: each rank x worker slot owns a disjoint part of the shards (round robin) and
reads `interleave` of them at once, drawing each sample from a random open shard. When a
shard ends, the next is drawn from the slot's part with replacement (`resampled`) or
from a shuffled pass over it. Validation: each slot reads its shards in order, once.
The position saved per worker is (open shards, byte offset in each, RNG state).
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Iterator, Optional

import numpy as np

from segany.data.datamodules.base import StreamDataModule
from segany.data.faults import FaultCounter, SampleFault
from segany.data.formats import clip_sidecar
from segany.data.sample import Record, SampleConfig
from segany.data.streams.dataset import StreamDataset
from segany.data.streams.reader import ShardSample, read_pairs
from segany.data.streams.shards import assign, check_readable, resolve, subset, summary

log = logging.getLogger("segany.data")


def _positive_int(value, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SampleFault("bad_json", f"field {field} must be a positive integer, got {value!r}")
    return value


def _score(ann: dict, name: str) -> float:
    v = ann.get(name)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def sa1b_record(pair: ShardSample) -> Record:
    """Parse and check one SA-1B json (image sizes, every annotation's RLE fields and id)."""
    try:
        meta = json.loads(pair.json)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SampleFault("bad_json", f"not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("image"), dict):
        raise SampleFault("bad_json", "missing field 'image'")
    h = _positive_int(meta["image"].get("height"), "image.height")
    w = _positive_int(meta["image"].get("width"), "image.width")
    anns = meta.get("annotations")
    if not isinstance(anns, list):
        raise SampleFault("bad_json", "missing field 'annotations'")
    if not anns:
        raise SampleFault("no_annotations", "the annotation list is empty")
    counts, ids, iou, stab, crowd = [], [], [], [], []
    for i, ann in enumerate(anns):
        seg = ann.get("segmentation") if isinstance(ann, dict) else None
        if not isinstance(seg, dict):
            raise SampleFault("bad_json", f"annotations[{i}]: missing field 'segmentation'")
        if not isinstance(seg.get("size"), list) or seg["size"] != [h, w]:
            raise SampleFault(
                "bad_json", f"annotations[{i}].segmentation.size is {seg.get('size')!r}, the image is {h}x{w}"
            )
        if not isinstance(seg.get("counts"), str):
            raise SampleFault(
                "bad_json",
                f"annotations[{i}].segmentation.counts must be a compressed "
                f"RLE string, got {type(seg.get('counts')).__name__}",
            )
        if isinstance(ann.get("id"), bool) or not isinstance(ann.get("id"), int) or not -(2**63) <= ann["id"] < 2**63:
            raise SampleFault("bad_json", f"annotations[{i}]: missing integer field 'id'")
        counts.append(seg["counts"])
        ids.append(ann["id"])
        iou.append(_score(ann, "predicted_iou"))
        stab.append(_score(ann, "stability_score"))
        crowd.append(bool(ann.get("iscrowd", 0)))
    return Record(
        pair.key,
        pair.url,
        pair.image,
        h,
        w,
        counts,
        np.array(ids, np.int64),
        np.array(iou),
        np.array(stab),
        np.array(crowd, bool),
    )


class SA1BStream(StreamDataset):
    def __init__(
        self,
        urls: list,
        cfg: SampleConfig,
        *,
        interleave: int = 4,
        resampled: bool = True,
        clip_sidecar: Optional[str] = None,
        **kw,
    ):
        super().__init__(cfg, **kw)
        self.urls = list(urls)
        self.interleave = max(1, int(interleave))
        self.resampled = bool(resampled)
        self.clip_sidecar = clip_sidecar  # suffix of the CLIP embedding files beside the shards; None: off
        self._clip_cache: dict = {}  # shard url -> (ids, embeddings) or None (no sidecar)

    def _clip_table(self, url: str):
        """The CLIP sidecar of shard `url` (segany.data.formats.clip_sidecar), None when absent
        (its masks then have no text prompt; logged once). Kept for the shards open at once."""
        if url not in self._clip_cache:
            if len(self._clip_cache) > 2 * self.interleave:
                self._clip_cache.pop(next(iter(self._clip_cache)))
            path = clip_sidecar.sidecar_path(url, self.clip_sidecar)
            if os.path.isfile(path):
                ids, emb, _ = clip_sidecar.read(path)
                self._clip_cache[url] = (ids, emb)
            else:
                log.warning("no CLIP sidecar %s: the masks of %s get no text prompt", path, url)
                self._clip_cache[url] = None
        return self._clip_cache[url]

    def _records(self, pairs, faults: FaultCounter) -> Iterator[tuple[Record, int]]:
        """(record, byte offset just after it) of each pair whose json is usable."""
        for pair in pairs:
            try:
                rec = sa1b_record(pair)
                if self.clip_sidecar:
                    table = self._clip_table(pair.url)
                    if table is not None:
                        rec.clip = clip_sidecar.lookup(*table, rec.ids)
                yield rec, pair.next_offset
            except SampleFault as f:
                faults.add(f.kind, pair.url, pair.key, f.message)
            except Exception as exc:  # noqa: BLE001 - never let one sample end the run
                faults.add("sample_error", pair.url, pair.key, repr(exc))

    def _val_records(self, faults, slot, n_slots):
        for i in assign(len(self.urls), slot, n_slots):
            for rec, _ in self._records(read_pairs(self.urls[i], 0, faults), faults):
                yield rec

    def _part(self, slot: int, n_slots: int) -> list:
        part = assign(len(self.urls), slot, n_slots, cover=True)
        if len(self.urls) < n_slots and slot == 0:
            log.warning("%d shards for %d rank x worker slots: some slots share shards", len(self.urls), n_slots)
        return part

    def _next_shard(self, position: dict, rng: np.random.Generator, part: list) -> int:
        if self.resampled:
            return part[int(rng.integers(len(part)))]
        if not position["queue"]:
            position["queue"] = [int(i) for i in rng.permutation(part)]
        return position["queue"].pop(0)

    def _fresh_position(self, rng, slot, n_slots) -> dict:
        part = self._part(slot, n_slots)
        position = {"slots": [], "queue": []}
        position["slots"] = [[self._next_shard(position, rng, part), 0] for _ in range(min(self.interleave, len(part)))]
        return position

    def _train_records(self, position, rng, faults, slot, n_slots) -> Iterator[Record]:
        part = self._part(slot, n_slots)
        slots = position["slots"]  # [[shard index, byte offset], ...]
        readers: list = [None] * len(slots)
        empty = 0  # shards ended since the last good record
        while True:
            j = int(rng.integers(len(slots)))
            if readers[j] is None:
                readers[j] = self._records(read_pairs(self.urls[slots[j][0]], slots[j][1], faults), faults)
            item = next(readers[j], None)
            if item is None:
                readers[j] = None
                slots[j] = [self._next_shard(position, rng, part), 0]
                empty += 1
                if empty > 2 * len(part) + 2 * len(slots):
                    raise RuntimeError(
                        f"no readable sample in {empty} consecutive shards of this worker's "
                        f"part ({[self.urls[i] for i in part[:3]]}...); see the warnings"
                    )
                continue
            empty = 0
            rec, slots[j][1] = item
            yield rec


class SA1BDataModule(StreamDataModule):
    """SA-1B (or any SA-1B-format shards). Keys: see configs/data/sa1b.yaml."""

    def __init__(
        self,
        train_shards=None,
        val_shards=None,
        *,
        train_num_shards: Optional[int] = None,
        interleave: int = 4,
        resampled: bool = True,
        check_shards: bool = True,
        clip_sidecar: Optional[str] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.clip_sidecar = clip_sidecar or None
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.train_num_shards = train_num_shards
        if train_num_shards is not None:
            subset([""] * train_num_shards, train_num_shards, "data.train_num_shards")  # type / range check now
        self.interleave = int(interleave)
        self.resampled = bool(resampled)
        self.check_shards = bool(check_shards)
        self.resolved: dict = {}  # split -> {count, first, last}: resolve_shards() or setup()

    def _urls(self, spec, train: bool, what: str) -> list:
        urls = resolve(spec, check=False, what=what)
        return subset(urls, self.train_num_shards, "data.train_num_shards") if train else urls

    def resolve_shards(self) -> dict:
        """split -> {count, first, last} of the shards this run will read (train: after
        train_num_shards), without opening them: train.py logs it and records it in the run's
        config as data_resolved. A spec that matches nothing fails here, naming it."""
        self.resolved = {
            split: summary(self._urls(spec, split == "train", f"data.{split}_shards"))
            for split, spec in (("train", self.train_shards), ("val", self.val_shards))
            if spec
        }
        return self.resolved

    def _stream(self, spec, train: bool, what: str) -> Optional[SA1BStream]:
        if not spec:
            return None
        urls = self._urls(spec, train, what)
        if self.check_shards:
            check_readable(urls, what, spec)  # only the shards that will be read
        self.resolved["train" if train else "val"] = summary(urls)
        return SA1BStream(
            urls,
            self.cfg,
            interleave=self.interleave,
            resampled=self.resampled,
            clip_sidecar=self.clip_sidecar,
            **self._stream_kwargs(train),
        )

    train_key, val_key = "train_shards", "val_shards"

    def _build_train(self) -> Optional[SA1BStream]:
        return self._stream(self.train_shards, True, "data.train_shards")

    def _build_val(self) -> Optional[SA1BStream]:
        return self._stream(self.val_shards, False, "data.val_shards")

    def _default_epoch_length(self, world_size: int) -> Optional[int]:
        raise ValueError(
            f"{type(self).__name__}: set epoch_length (training batches per rank per epoch); "
            "resampled shards have no natural end"
        )
