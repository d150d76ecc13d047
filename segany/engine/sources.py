"""Input of a data-engine stage, cut into output-shard jobs.

A folder of images (jpg / jpeg / png, sorted by path): job i holds images
[i * shard_size, (i + 1) * shard_size) and writes ``sa-<i:06d>.tar``; image ids are the
global index. SA-1B-format shards (any webdataset spec datamodules accepts): one job per
input shard, written under the input shard's name; keys, image ids and (for ``semi``)
the existing annotations come from the shard. The cut depends only on the input, so every
run of the same command plans the same jobs (what resuming relies on).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

IMAGE_EXTS = (".jpg", ".jpeg", ".png")


@dataclass
class Item:
    key: str  # sample key in the output shard
    ext: str  # jpg | png (image bytes are copied unchanged)
    data: bytes
    image_id: int
    meta: Optional[dict]  # the input's SA-1B json (shards), None for plain images


@dataclass
class Job:
    index: int
    name: str  # output shard file name
    items: Callable[[], Iterator[Item]]


def _folder_items(paths: list, first: int) -> Iterator[Item]:
    for i, p in enumerate(paths):
        with open(p, "rb") as f:
            data = f.read()
        ext = os.path.splitext(p)[1].lower().lstrip(".")
        yield Item(f"sa_{first + i}", "jpg" if ext == "jpeg" else ext, data, first + i, None)


def _shard_items(url: str) -> Iterator[Item]:
    from segany.data.decode import numeric_id
    from segany.data.faults import FaultCounter
    from segany.data.formats.sa1b import image_ext
    from segany.data.streams.reader import read_pairs

    faults = FaultCounter(20, where="engine input")
    for pair in read_pairs(url, 0, faults):
        try:
            meta = json.loads(pair.json)
        except ValueError as exc:
            raise ValueError(f"{url}: {pair.key}.json is not valid JSON: {exc}") from None
        image_id = (meta.get("image") or {}).get("image_id")
        yield Item(
            os.path.basename(pair.key),
            image_ext(pair.image),
            pair.image,
            int(image_id) if isinstance(image_id, int) else numeric_id(pair.key),
            meta,
        )
    if sum(faults.total.values()):
        raise ValueError(f"{url}: unreadable input ({dict(faults.total)}); fix or remove the shard")


def plan_jobs(input_spec: str, shard_size: int = 1000, prefix: str = "sa") -> list:
    """input_spec: a folder of images, or a shard spec (segany.data.streams.shards: a folder of
    *.tar shards, a list file, a brace range, a glob, ...)."""
    is_dir = isinstance(input_spec, str) and os.path.isdir(input_spec)
    paths = []
    if is_dir:
        paths = sorted(
            os.path.join(dp, f) for dp, _, fs in os.walk(input_spec) for f in fs if f.lower().endswith(IMAGE_EXTS)
        )
        if not paths and not any(f.endswith(".tar") for f in os.listdir(input_spec)):
            raise FileNotFoundError(f"--input {input_spec}: no .jpg/.jpeg/.png image and no *.tar shard in this folder")
    if paths:
        if shard_size < 1:
            raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
        return [
            Job(j, f"{prefix}-{j:06d}.tar", lambda s=s: _folder_items(paths[s : s + shard_size], s))
            for j, s in enumerate(range(0, len(paths), shard_size))
        ]
    from segany.data.streams.shards import resolve

    urls = resolve(input_spec, check=True, what="--input")
    names = [os.path.basename(u.rstrip("/")) for u in urls]
    if len(set(names)) != len(names):
        raise ValueError(f"--input {input_spec}: two input shards share a file name; outputs would collide")
    return [
        Job(j, name if name.endswith(".tar") else f"{name}.tar", lambda u=u: _shard_items(u))
        for j, (u, name) in enumerate(zip(urls, names))
    ]
