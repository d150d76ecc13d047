"""Run a data-engine stage over planned jobs: this slot's share (job index mod slots), one
output shard per job, written to a temporary file and renamed when complete — a shard that
exists is done, so a restarted job skips it and a killed one leaves only a temp file (removed
by the next run of the slot)."""

from __future__ import annotations

import glob
import json
import logging
import os
import time
from typing import Callable

from webdataset import TarWriter

from segany.data.decode import decode_image
from segany.data.formats.sa1b import image_json
from segany.utils.io import TMP_MARK, atomic_write

log = logging.getLogger("segany.engine")


def write_shard(job, annotate: Callable, path: str) -> dict:
    """Annotate every image of a job into the shard `path` (atomically). Images without any
    mask are left out (SA1BDataModule would skip them as faults)."""
    stats = {"images": 0, "written": 0, "masks": 0}
    with atomic_write(path, "wb") as f:
        writer = TarWriter(f, mtime=1.0)
        for item in job.items():
            image = decode_image(item.data, f"{job.name}:{item.key}")
            anns = annotate(image, item.image_id, item.meta)
            stats["images"] += 1
            if not anns:
                continue
            meta = image_json(item.image_id, image.shape[0], image.shape[1], f"{item.key}.{item.ext}", anns)
            writer.write({"__key__": item.key, item.ext: item.data, "json": json.dumps(meta).encode()})
            stats["written"] += 1
            stats["masks"] += len(anns)
        writer.close()
    return stats


def run_jobs(jobs: list, write: Callable, out_dir: str, slot: int = 0, n_slots: int = 1, out_name=None) -> dict:
    """The resumable, sharded loop of every engine job: write(job, path) -> stats (numbers) for
    each job of jobs[slot::n_slots] whose output `out_dir/out_name(job)` (default job.name) does
    not exist yet; `write` writes atomically (segany.utils.io.atomic_write). Stats per output go
    to `<output stem>.stats.json`. Returns {"done", "skipped", and every stat summed}."""
    if not 0 <= slot < n_slots:
        raise ValueError(f"slot {slot} is not in 0..{n_slots - 1}")
    os.makedirs(out_dir, exist_ok=True)
    totals = {"done": 0, "skipped": 0}
    for job in jobs:
        if job.index % n_slots != slot:
            continue
        name = out_name(job) if out_name else job.name
        path = os.path.join(out_dir, name)
        for stale in glob.glob(glob.escape(path + TMP_MARK) + "*"):  # left by a killed run of this slot
            os.remove(stale)
        if os.path.exists(path):
            totals["skipped"] += 1
            continue
        t0 = time.time()
        stats = write(job, path)
        for k, v in stats.items():
            totals[k] = totals.get(k, 0) + v
        totals["done"] += 1
        with open(os.path.join(out_dir, f"{os.path.splitext(name)[0]}.stats.json"), "w") as f:
            json.dump(dict(stats, seconds=round(time.time() - t0, 1)), f)
        log.info("wrote %s: %s (%.1f s)", path, stats, time.time() - t0)
    return totals


def run_stage(jobs: list, annotate: Callable, out_dir: str, slot: int = 0, n_slots: int = 1) -> dict:
    """Write the shards of jobs[slot::n_slots] that are not in out_dir yet.
    Returns {"done": shards written now, "skipped": already there, "images", "masks"}."""
    totals = {"images": 0, "written": 0, "masks": 0}
    totals.update(run_jobs(jobs, lambda job, path: write_shard(job, annotate, path), out_dir, slot, n_slots))
    return totals
