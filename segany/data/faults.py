"""Fault accounting: every skipped sample is counted by kind, warned about once (with
shard and key), and its count travels with the next batch (`batch["faults"]`)."""

from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger("segany.data")

FAULT_KINDS = (
    "bad_image",  # image bytes do not decode, truncated JPEG, wrong size
    "bad_json",  # json does not parse, missing/ill-typed fields, invalid RLE
    "no_annotations",  # json has an empty annotation list
    "orphan",  # an image without its json or a json without its image
    "duplicate_member",  # a key whose members hold one extension twice (a renamed member): dropped
    "truncated_tar",  # the shard ends inside a member (or without end-of-archive)
    "corrupt_tar",  # a damaged tar header; reading resumed at the next valid header
    "shard_error",  # the shard could not be opened or read (I/O error, pipe failed)
    "bad_annotation",  # an annotation (COCO segmentation, mask file, labelme shape) that cannot be used
    "empty_after_filter",  # no mask left after the area/score filters and resampling
    "sample_error",  # any other error while decoding one sample (a bug or data nobody foresaw)
)


class SampleFault(Exception):
    """A sample (or shard) that must be skipped: kind is one of FAULT_KINDS."""

    def __init__(self, kind: str, message: str):
        assert kind in FAULT_KINDS, kind
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


class FaultCounter:
    """Counts faults; logs each (kind, shard, key) once and at most `max_warnings` per kind."""

    def __init__(self, max_warnings: int = 20, where: str = ""):
        self.total: Counter = Counter()
        self._pending: Counter = Counter()
        self._warned: set = set()
        self._nwarn: Counter = Counter()
        self.max_warnings = max_warnings
        self.where = where

    def add(self, kind: str, shard: str, key: str, message: str) -> None:
        assert kind in FAULT_KINDS, kind
        self.total[kind] += 1
        self._pending[kind] += 1
        ident = (kind, shard, key)
        if ident in self._warned or self._nwarn[kind] > self.max_warnings:
            return
        self._nwarn[kind] += 1
        if self._nwarn[kind] > self.max_warnings:
            log.warning("%s: more %s faults are counted but no longer logged", self.where, kind)
            return
        self._warned.add(ident)
        log.warning(
            "skipped %s%s: shard %s key %s: %s", kind, f" ({self.where})" if self.where else "", shard, key, message
        )

    def pop(self) -> dict:
        """Counts since the previous pop (attached to the next sample that is yielded)."""
        out = dict(self._pending)
        self._pending.clear()
        return out
