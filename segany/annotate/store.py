"""The output of an annotation session: SA-1B-format shards, changed one image at a time.

Each change (accept, delete, brush, undo) is a read-modify-write of the one shard that holds
the image, under an exclusive lock (`fcntl.flock` on ``OUT/.lock``, plus a thread lock), and
the shard is rewritten with `segany.utils.io.atomic_write` exactly as the data engine writes
its shards (webdataset TarWriter, the json of `segany.data.formats.sa1b.image_json`). So a
killed server leaves every shard whole (it loses at most the mask being drawn), and two
browser tabs or two servers on one output folder never interleave their writes. Reads take
the same lock (a shard may be removed between a reader's listing and its open). The lock is
reentrant within a thread, so a caller can hold it across an update and its own bookkeeping.

Mask ids are never handed out twice for one image: ``OUT/mask_ids.json`` keeps, per image,
1 + the largest mask number (id % ID_STRIDE) ever stored, so a page still showing a mask
that another annotator deleted cannot brush or delete the mask accepted after it. Images
without masks are left out of the shard (SA1BDataModule would count them as faults); a
shard left with no image is removed.

Per-mask provenance, besides SA-1B's fields: ``source`` (manual | semi | auto), ``annotator``,
``seconds`` (time spent on the mask), ``clicks``, ``time`` (unix time of the last change),
``label`` (optional category).
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from webdataset import TarWriter

from segany.data.faults import FaultCounter
from segany.data.formats.sa1b import image_ext, image_json
from segany.data.streams.reader import read_pairs
from segany.engine.annotate import ID_STRIDE
from segany.utils.io import TMP_MARK, atomic_write, atomic_write_json

LOCK_NAME = ".lock"
SEEN_NAME = "semi_seen.json"  # keys of the images the semi stage has already run on
IDS_NAME = "mask_ids.json"  # image key -> 1 + the largest mask number ever stored


class ShardStore:
    """out_dir: the output folder (created). Shard names are the caller's (one per input job)."""

    def __init__(self, out_dir: str):
        self.out_dir = os.path.abspath(out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        self._thread_lock = threading.RLock()
        self._depth = 0  # nesting of locked() in the thread holding _thread_lock
        with self.locked():  # temporary files of a killed writer (none is writing: we hold the lock)
            for stale in glob.glob(os.path.join(glob.escape(self.out_dir), f"*.tar{TMP_MARK}*")):
                os.remove(stale)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive, across threads and processes; reentrant (flock is taken once per thread:
        a second flock on a new open file would wait for the first)."""
        with self._thread_lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            with open(os.path.join(self.out_dir, LOCK_NAME), "a+") as f:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
                self._depth = 1
                try:
                    yield
                finally:
                    self._depth = 0
                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def path(self, shard: str) -> str:
        return os.path.join(self.out_dir, shard)

    def shards(self) -> list:
        return sorted(glob.glob(os.path.join(glob.escape(self.out_dir), "*.tar")))

    @staticmethod
    def read_shard(path: str) -> dict:
        """key -> (image bytes, meta dict) of one shard; {} if it does not exist."""
        if not os.path.exists(path):
            return {}
        faults = FaultCounter(20, where="annotation output")
        out = {os.path.basename(p.key): (p.image, json.loads(p.json)) for p in read_pairs(path, 0, faults)}
        if sum(faults.total.values()):
            raise ValueError(f"{path}: unreadable output shard ({dict(faults.total)})")
        return out

    def annotations(self, shard: str, key: str) -> list:
        with self.locked():
            entry = self.read_shard(self.path(shard)).get(key)
        return entry[1]["annotations"] if entry else []

    def next_number(self, key: str, cur: list) -> int:
        """The mask number (id % ID_STRIDE) for a new mask of image `key` with annotations `cur`:
        above every current one and every one stored before. Call inside `update`'s change."""
        with self.locked():
            top = self._read_json(IDS_NAME, {}).get(key, 0)
        return max([top] + [1 + int(c["id"]) % ID_STRIDE for c in cur])

    def update(
        self, shard: str, key: str, data: bytes, image_id: int, hw: tuple, change: Callable[[list], Optional[list]]
    ) -> tuple:
        """Apply `change(current annotations) -> new annotations` (None: no change) to image
        `key` of `shard`, atomically. Returns (before, after)."""
        with self.locked():
            path = self.path(shard)
            samples = self.read_shard(path)
            before = samples[key][1]["annotations"] if key in samples else []
            after = change([dict(a) for a in before])
            if after is None:
                return before, before
            top = max((1 + int(a["id"]) % ID_STRIDE for a in after), default=0)
            ids = self._read_json(IDS_NAME, {})
            if top > ids.get(key, 0):  # written before the shard: a kill in between leaves a gap only
                atomic_write_json(self.path(IDS_NAME), {**ids, key: top})
            if after:
                ext = image_ext(data)
                samples[key] = (data, image_json(image_id, hw[0], hw[1], f"{key}.{ext}", after))
            else:
                samples.pop(key, None)
            if not samples:
                if os.path.exists(path):
                    os.remove(path)
                return before, after
            with atomic_write(path, "wb") as f:
                writer = TarWriter(f, mtime=1.0)
                for k in sorted(samples):
                    img, meta = samples[k]
                    writer.write({"__key__": k, image_ext(img): img, "json": json.dumps(meta).encode()})
                writer.close()
            return before, after

    def all_images(self) -> list:
        """The json of every annotated image in the output."""
        with self.locked():
            return [meta for path in self.shards() for _, meta in self.read_shard(path).values()]

    def _read_json(self, name: str, default):
        path = self.path(name)
        if not os.path.exists(path):
            return default
        with open(path) as f:
            return json.load(f)

    def _seen(self) -> set:
        return set(self._read_json(SEEN_NAME, []))

    def is_seen(self, key: str) -> bool:
        """Whether the semi stage has already placed its masks on image `key`."""
        return key in self._seen()

    def mark_seen(self, key: str) -> None:
        with self.locked():
            seen = self._seen()
            if key not in seen:
                atomic_write_json(self.path(SEEN_NAME), sorted(seen | {key}))
