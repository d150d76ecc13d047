"""Stream image + json pairs out of one SA-1B-style tar shard, counting every fault.

Members are grouped by key as webdataset does (`dir/sa_1.jpg` + `dir/sa_1.json` -> key
`dir/sa_1`, extensions lower-cased). A group is a sample when it holds an image
(jpg/jpeg/png) and a json; a group lacking either is an orphan, and a group holding one
extension twice (a damaged header that names a member after its neighbour) is dropped:
which of the two belongs to the key cannot be told, and pairing one key's image with
another's json would train on wrong masks without a word. Each yielded pair
carries `next_offset`, the byte offset where the next group starts, so that a reader
can resume exactly after it. A shard cut short, a damaged header or an I/O error is
counted once and never ends the epoch: reading goes on with the next shard.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, Optional

from segany.data.faults import FaultCounter
from segany.data.formats.tar import TarTruncated, iter_members
from segany.data.streams.shards import close_quietly, open_shard

IMAGE_EXTS = ("jpg", "jpeg", "png")
_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


@dataclass
class ShardSample:
    key: str
    image: bytes
    json: bytes
    url: str
    next_offset: int


def split_name(name: str) -> tuple[Optional[str], Optional[str]]:
    m = _NAME.match(name)
    return (m.group(1), m.group(2).lower()) if m else (None, None)


def _complete(key: Optional[str], group: dict, url: str, next_offset: int, twice=None) -> Optional[ShardSample]:
    image_ext = next((e for e in IMAGE_EXTS if e in group), None)
    if key is None or image_ext is None or "json" not in group or twice is not None:
        return None
    return ShardSample(key, group[image_ext], group["json"], url, next_offset)


def _pair(key: str, group: dict, url: str, next_offset: int, faults: FaultCounter, twice=None):
    if twice is not None:
        faults.add("duplicate_member", url, key, f"holds .{twice} twice (a damaged member name?): dropped")
        return None
    pair = _complete(key, group, url, next_offset)
    if pair is not None:
        return pair
    image_ext = next((e for e in IMAGE_EXTS if e in group), None)
    have = ", ".join(sorted(group)) or "nothing"
    need = "json" if image_ext is not None else "image"
    faults.add("orphan", url, key, f"has {have}, no {need}")
    return None


def read_pairs(url: str, offset: int, faults: FaultCounter) -> Iterator[ShardSample]:
    """Pairs of shard `url` from byte `offset` (a group boundary) on."""
    try:
        stream = open_shard(url, offset)
    except Exception as exc:  # noqa: BLE001 - any I/O failure is a counted fault
        faults.add("shard_error", url, "-", f"cannot open: {exc!r}")
        return
    key, group, last_end = None, {}, offset
    twice = None  # an extension the current group holds twice

    def on_corrupt(at: int, nbytes: int) -> None:
        faults.add("corrupt_tar", url, f"byte {at}", f"damaged tar header, skipped {nbytes} bytes")

    try:
        for m in iter_members(stream, offset, on_corrupt):
            mkey, ext = split_name(m.name)
            if mkey is None:
                continue  # no extension: not part of any sample
            if mkey != key:
                if key is not None:
                    pair = _pair(key, group, url, m.offset, faults, twice)
                    if pair is not None:
                        yield pair
                key, group, twice = mkey, {}, None
            if ext in group:
                twice = ext
            group[ext] = m.data
            last_end = m.next_offset
        if key is not None:
            pair = _pair(key, group, url, last_end, faults, twice)
            if pair is not None:
                yield pair
    except TarTruncated as exc:
        # The pending group is yielded if whole; if the cut member was part of it (or cannot
        # be named) it is lost with this one fault; otherwise it is an orphan in its own right.
        cut_key = split_name(exc.name)[0] if exc.name else None
        pair = _complete(key, group, url, last_end, twice)
        if pair is not None:
            yield pair
        elif key is not None and cut_key is not None and cut_key != key:
            _pair(key, group, url, last_end, faults, twice)
        try:  # a pipe that ends early usually failed: its exit status says why
            stream.close()
        except Exception as why:  # noqa: BLE001
            faults.add("shard_error", url, cut_key or key or "-", f"read failed: {why!r}")
        else:
            faults.add("truncated_tar", url, cut_key or key or "-", str(exc))
    except Exception as exc:  # noqa: BLE001 - I/O error mid-shard (network, pipe exit status)
        pair = _complete(key, group, url, last_end, twice)
        if pair is not None:
            yield pair
        faults.add("shard_error", url, key or "-", f"read failed: {exc!r}")
    finally:
        close_quietly(stream)
