"""A training data-loader worker killed from outside (as the OOM killer does): the error names
the worker, its rank, and a shard and key it was reading (segany/data/streams/worker_notes.py).
The whole run (error, then resume bit-identical) is in tests/test_resume.py."""

import os
import signal
import tarfile
import time

import numpy as np
import pytest

from segany.data import SA1BDataModule
from segany.data.scenes import make_scene
from segany.data.streams.worker_notes import WorkerNotes, worker_death
from segany.testing.data import jpeg, sa1b_json, write_tar


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("notes")
    for s in range(2):
        members = []
        for i in range(4):
            key = 100 * s + i
            img, masks = make_scene(np.random.default_rng(key), 40, 56, 3)
            members += [(f"sa_{key}.jpg", jpeg(img)), (f"sa_{key}.json", sa1b_json(key, masks))]
        write_tar(str(root / f"sa_{s:06d}.tar"), members)
    return sorted(str(p) for p in root.glob("*.tar"))


def test_a_worker_killed_from_outside_is_named_with_its_shard_and_key(shards):
    dm = SA1BDataModule(shards, batch_size=2, num_workers=1, epoch_length=1000, img_size=64, interleave=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)
    (pid,) = loader.notes.read()  # the worker's line names its pid
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(RuntimeError) as err:
        for _ in range(100):  # batches read ahead may still come first
            next(it)
            time.sleep(0.05)
    message = loader.worker_death(err.value)
    assert message.startswith(f"data-loader worker 0 of rank 0 (pid {pid}) died "), message
    shard = next(s for s in shards if f"shard {s} key " in message)  # one of the shards ...
    with tarfile.open(shard) as tar:  # ... and a key in it
        keys = {m.name.rsplit(".", 1)[0] for m in tar.getmembers()}
    assert message.split(f"shard {shard} key ")[1].split()[0] in keys, message
    assert f"[{str(err.value).strip()}]" in message  # torch's own words kept
    assert loader.worker_death(RuntimeError("CUDA out of memory")) is None  # other errors pass through


def test_several_dead_workers_and_one_that_never_wrote():
    notes = WorkerNotes()
    for worker, pid in ((0, 11), (1, 12)):
        with open(os.path.join(notes.dir, f"worker{worker}"), "wb") as f:
            f.write(f"{pid} while decoding shard s{worker}.tar key k{worker}".encode().ljust(1024, b"\0"))
    message = worker_death(RuntimeError("DataLoader worker (pid(s) 12, 13) exited unexpectedly"), notes, rank=3)
    assert message.startswith(
        "data-loader worker 1 of rank 3 (pid 12) died while decoding shard s1.tar key k1; "
        "data-loader worker ? of rank 3 (pid 13) died no note (it died before reading anything)"
    ), message
