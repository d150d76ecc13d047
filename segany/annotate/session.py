"""The model side of an annotation session: the input images (addressed by index), the
model, each image's embedding computed once (LRU cache; the next image's prefetched in a
background thread) and the decoding of a prompt into masks.

Images come from `segany.engine.plan_jobs` (a folder of images or SA-1B-format shards), so
the output shard of an image is the shard the data engine would write it to. Masks travel
to the page as row-major runs: [n0, n1, n2, ...] alternating background / foreground
lengths, starting with background (cheap to paint in JS).
"""

from __future__ import annotations

import os
import threading
import zlib
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from types import SimpleNamespace
from typing import Optional

import cv2
import numpy as np
import torch

from segany.data.decode import decode_image
from segany.engine.cli import load as load_engine_model
from segany.engine.sources import plan_jobs
from segany.inference import SamPredictor
from segany.utils.precision import check_precision


@dataclass
class Entry:
    """One input image: the job (output shard) it belongs to and its position in it."""

    job: object
    pos: int
    key: str
    image_id: int
    crc: int  # CRC32 of the image bytes: the output must hold the same image under `key`


class Images:
    """The input images in the engine's order; `item(i)` re-reads image i (small LRU cache)."""

    def __init__(self, spec: str, shard_size: int, prefix: str = "manual", cache: int = 4):
        self.jobs = plan_jobs(spec, shard_size, prefix=prefix)
        self.entries = [
            Entry(job, p, it.key, it.image_id, zlib.crc32(it.data))
            for job in self.jobs
            for p, it in enumerate(job.items())
        ]
        if not self.entries:
            raise FileNotFoundError(f"--images {spec}: no image")
        self._cache: OrderedDict = OrderedDict()
        self._size = cache
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.entries)

    def check_output(self, store) -> None:
        """Every image the output folder holds must be the input image of that key (resuming on
        an input folder that changed since would put masks on the wrong images)."""
        by_key = {e.key: e for e in self.entries}
        for path in store.shards():
            for key, (data, _) in store.read_shard(path).items():
                e = by_key.get(key)
                if e is None or zlib.crc32(data) != e.crc or os.path.basename(path) != e.job.name:
                    raise ValueError(
                        f"{path}: holds image {key}, which is not the input's image {key} (the input changed "
                        "since these masks were drawn?); annotate into a new --out"
                    )

    def item(self, i: int):
        """-> (engine Item, (H, W, 3) uint8 RGB)."""
        with self._lock:
            if i in self._cache:
                self._cache.move_to_end(i)
                return self._cache[i]
        e = self.entries[i]
        items = e.job.items()
        try:
            item = next(islice(items, e.pos, None))
        finally:
            items.close()
        value = (item, decode_image(item.data, f"{e.job.name}:{item.key}"))
        with self._lock:
            self._cache[i] = value
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return value


def mask_runs(mask: np.ndarray) -> list:
    """(H, W) bool -> row-major run lengths, background first."""
    flat = mask.reshape(-1).astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], edges, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat.size and flat[0] else runs


def paint(mask: np.ndarray, strokes: list) -> np.ndarray:
    """Brush (erase=False) / eraser (erase=True) disks {x, y, r, erase} on a copy of `mask`."""
    out = mask.astype(np.uint8).copy()
    for s in strokes:
        cv2.circle(out, (int(round(s.x)), int(round(s.y))), max(int(round(s.r)), 0), 0 if s.erase else 1, -1)
    return out.astype(bool)


class Model:
    """The model and the embeddings of the last few images. Thread-safe: reload swaps the
    model and empties the cache; embeddings are keyed by (model generation, image). An image
    being embedded (by a request or the prefetch) is embedded once: other requests for it wait
    for that result; it leaves `_pending` when it enters the cache."""

    def __init__(
        self, checkpoint: Optional[str], variant: str, device="cpu", trust_checkpoint=False, cache: int = 4,
        precision: str = "fp32",
    ):  # fmt: skip
        self.precision = check_precision(precision, "--precision")  # SamPredictor's: fp32 | bf16 | auto
        args = dict(checkpoint=checkpoint, model=variant, trust_checkpoint=trust_checkpoint, device=device)
        self.args = SimpleNamespace(**args)  # what segany.engine.cli.load reads
        self._lock = threading.Lock()
        self._cache: OrderedDict = OrderedDict()
        self._size = cache
        self._pending: dict = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self.generation = 0
        self.model, self.description = load_engine_model(self.args)

    def reload(self) -> str:
        """Read --checkpoint again (e.g. a newer last.ckpt) and use it from now on."""
        model, what = load_engine_model(self.args)
        with self._lock:
            self.model, self.description = model, what
            self.generation += 1
            self._cache.clear()
            self._pending.clear()
        return what

    def _embed(self, gen: int, model, i: int, load_image):
        """Embed load_image() with `model`; the result enters the cache (if the model is still
        current), and a failure is not kept: the next request for image i tries again."""
        try:
            predictor = SamPredictor(model, precision=self.precision)
            predictor.set_image(load_image())
        except BaseException:
            with self._lock:
                self._pending.pop((gen, i), None)
            raise
        value = (model, predictor.features, predictor.original_size, predictor.input_size)
        with self._lock:
            if gen == self.generation:
                self._cache[i] = value
                while len(self._cache) > self._size:
                    self._cache.popitem(last=False)
            self._pending.pop((gen, i), None)
        return value

    def embedding(self, i: int, image: np.ndarray):
        with self._lock:
            gen, model = self.generation, self.model
            if i in self._cache:
                self._cache.move_to_end(i)
                return self._cache[i]
            future = self._pending.get((gen, i))
            if future is None:
                future = self._pending[(gen, i)] = Future()
                mine = True
            else:
                mine = False
        if not mine:
            return future.result()
        try:
            value = self._embed(gen, model, i, lambda: image)
        except BaseException as exc:
            future.set_exception(exc)
            raise
        future.set_result(value)
        return value

    def prefetch(self, i: int, load_image) -> None:
        """Embed image i in the background (load_image() -> RGB array), unless cached."""
        with self._lock:
            gen = self.generation
            if i in self._cache or (gen, i) in self._pending:
                return
            model = self.model
            self._pending[(gen, i)] = self._pool.submit(self._embed, gen, model, i, load_image)

    @torch.no_grad()
    def decode(self, i: int, image: np.ndarray, points: list, box: Optional[list], multimask: bool):
        """points: [(x, y, label)] px, label 1 = object / 0 = background; box: xyxy px.
        -> masks (C, H, W) bool, scores (C,); C = 3 with multimask, else 1."""
        model, features, original_size, input_size = self.embedding(i, image)
        predictor = SamPredictor(model, precision=self.precision)
        predictor.features, predictor.original_size, predictor.input_size = features, original_size, input_size
        predictor.is_image_set = True
        coords = np.array([[p[0], p[1]] for p in points], np.float32) if points else None
        labels = np.array([p[2] for p in points], np.int64) if points else None
        masks, scores, _ = predictor.predict(
            coords, labels, None if box is None else np.asarray(box, np.float32), multimask_output=multimask
        )
        return masks, scores
