"""The output of an annotation session: SA-1B-format shards, changed one image at a time.

Each change (accept, delete, brush, undo) is a read-modify-write of the one shard that holds
the image, under an exclusive lock (`fcntl.flock` on ``OUT/.lock``, plus a thread lock), and
the shard is rewritten with `segany.utils.io.atomic_write` exactly as the data engine writes
its shards (webdataset TarWriter, the json of `segany.data.formats.sa1b.image_json`). So a
killed server leaves every shard whole (it loses at most the mask being drawn), and two
browser tabs or two servers on one output folder never interleave their writes. Images
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
from segany.utils.io import TMP_MARK, atomic_write, atomic_write_json

LOCK_NAME = ".lock"
SEEN_NAME = "semi_seen.json"  # keys of the images the semi stage has already run on


class ShardStore:
    """out_dir: the output folder (created). Shard names are the caller's (one per input job)."""

    def __init__(self, out_dir: str):
        self.out_dir = os.path.abspath(out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        self._thread_lock = threading.RLock()
        with self.locked():  # temporary files of a killed writer (none is writing: we hold the lock)
            for stale in glob.glob(os.path.join(glob.escape(self.out_dir), f"*.tar{TMP_MARK}*")):
                os.remove(stale)

    @contextmanager
    def locked(self) -> Iterator[None]:
        with self._thread_lock, open(os.path.join(self.out_dir, LOCK_NAME), "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
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
        entry = self.read_shard(self.path(shard)).get(key)
        return entry[1]["annotations"] if entry else []

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

    def all_images(self) -> Iterator[dict]:
        """The json of every annotated image in the output."""
        for path in self.shards():
            for _, meta in self.read_shard(path).values():
                yield meta

    def _seen(self) -> set:
        path = self.path(SEEN_NAME)
        if not os.path.exists(path):
            return set()
        with open(path) as f:
            return set(json.load(f))

    def is_seen(self, key: str) -> bool:
        """Whether the semi stage has already placed its masks on image `key`."""
        return key in self._seen()

    def mark_seen(self, key: str) -> None:
        with self.locked():
            seen = self._seen()
            if key not in seen:
                atomic_write_json(self.path(SEEN_NAME), sorted(seen | {key}))
