"""Streams over a finite list of images addressed by index (a COCO json, image folders).

Validation: each rank x worker slot reads images slot, slot + n_slots, ... once, in order.
Training: each pass walks a fresh permutation of the images (seeded by seed and pass), split
between the slots; the position saved per worker is (pass, index in this slot's share), so a
resumed run carries on exactly there.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np

from segany.data.faults import FaultCounter
from segany.data.sample import Record
from segany.data.streams.dataset import StreamDataset


class IndexedStream(StreamDataset):
    """Subclasses provide num_images() and record(idx, faults) -> Record, or None when the
    image is skipped (its faults already counted)."""

    def num_images(self) -> int:
        raise NotImplementedError

    def record(self, idx: int, faults: FaultCounter) -> Optional[Record]:
        raise NotImplementedError

    def _val_records(self, faults, slot, n_slots) -> Iterator[Record]:
        for idx in range(slot, self.num_images(), n_slots):
            rec = self.record(idx, faults)
            if rec is not None:
                yield rec

    def _fresh_position(self, rng, slot, n_slots) -> dict:
        return {"pass": 0, "index": 0}

    def _train_records(self, position, rng, faults, slot, n_slots) -> Iterator[Record]:
        n = self.num_images()
        while True:
            order = np.random.default_rng([self.seed, position["pass"]]).permutation(n)
            mine = order[slot::n_slots] if slot < n else order[slot % n : slot % n + 1]
            usable = position["index"] > 0
            while position["index"] < len(mine):
                idx = int(mine[position["index"]])
                position["index"] += 1
                rec = self.record(idx, faults)
                if rec is not None:
                    usable = True
                    yield rec
            if not usable:
                raise RuntimeError(
                    f"no image of this worker's share of {len(mine)} has a usable annotation; see the warnings"
                )
            position["pass"] += 1
            position["index"] = 0
