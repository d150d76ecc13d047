"""Training streams: epoch quota, and a resumed run neither replays nor skips data."""

import io
import logging
from collections import Counter

import numpy as np
import pytest
import torch

from segany.data import SA1BDataModule
from segany.data.scenes import make_scene
from segany.data.streams.loader import worker_states
from segany.testing.data import jpeg, sa1b_json, write_tar


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    for s in range(4):
        members = []
        for i in range(5):
            key = 100 * s + i
            img, masks = make_scene(np.random.default_rng(key), 40, 56, 5)
            members += [(f"sa_{key}.jpg", jpeg(img)), (f"sa_{key}.json", sa1b_json(key, masks))]
        write_tar(str(root / f"sa_{s:06d}.tar"), members)
    return str(root / "sa_{000000..000003}.tar")


def make_dm(shards, **kw):
    args = dict(
        batch_size=2,
        num_workers=0,
        epoch_length=3,
        img_size=64,
        interleave=2,
        resampled=True,
        jitter=True,
        jitter_scale=(0.5, 1.5),
        flip=True,
        seed=3,
    )
    args.update(kw)
    dm = SA1BDataModule(shards, **args)
    dm.setup("fit")
    return dm


def fingerprint(batch):
    """(key, boxes) per sample: the boxes carry the augmentation."""
    assert "_data_state" not in batch
    return [(k, tuple(b.flatten().tolist())) for k, b in zip(batch["image_id"], batch["boxes"])]


def consume(dm, n_batches):
    """Run epochs like the fit loop until n_batches were consumed (like Lightning, never drawing
    past an epoch's last batch); return a fingerprint per sample."""
    out = []
    while len(out) < n_batches:
        for batch in dm.train_dataloader():
            out.append(fingerprint(batch))
            if len(out) == n_batches:
                break
    return out


def roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # what a checkpoint can hold


def test_epoch_length_and_len(shards):
    dm = make_dm(shards, epoch_length=5, num_workers=2)
    loader = dm.train_dataloader()
    assert len(loader) == 5
    assert len(list(loader)) == 5


def test_resume_is_exact_in_one_process(shards):
    reference = consume(make_dm(shards), 9)
    first = make_dm(shards)
    done = consume(first, 4)  # one epoch and one batch of the next
    assert done == reference[:4]
    second = make_dm(shards)
    second.train_dataloader().load_state_dict(roundtrip(first.train_dataloader().state_dict()))
    assert consume(second, 5) == reference[4:]  # augmentation included (boxes)


def test_resume_with_workers_neither_replays_nor_skips(shards):
    reference = consume(make_dm(shards, num_workers=2, epoch_length=4), 12)
    first = make_dm(shards, num_workers=2, epoch_length=4)
    done = consume(first, 6)
    state = roundtrip(first.train_dataloader().state_dict())
    assert sorted(worker_states(state["ranks"][0]["loader"])) == [0, 1]
    second = make_dm(shards, num_workers=2, epoch_length=4)
    second.train_dataloader().load_state_dict(state)
    rest = consume(second, 6)
    flat = lambda batches: Counter(s for b in batches for s in b)  # noqa: E731
    assert flat(done) + flat(rest) == flat(reference)
    assert done + rest == reference  # in the same order, too


def test_state_saved_at_an_epoch_end_resumes_into_a_full_epoch(shards):
    # consume() stops at the epoch's last batch without drawing StopIteration, as Lightning
    # does: the saved state must lead into the next epoch, not an empty rest of this one
    reference = consume(make_dm(shards, num_workers=2, epoch_length=3), 6)
    first = make_dm(shards, num_workers=2, epoch_length=3)
    assert consume(first, 3) == reference[:3]
    second = make_dm(shards, num_workers=2, epoch_length=3)
    second.train_dataloader().load_state_dict(roundtrip(first.train_dataloader().state_dict()))
    assert [fingerprint(b) for b in second.train_dataloader()] == reference[3:]


def test_an_epoch_left_early_is_finished_not_skipped(shards):
    # Lightning calls iter() again before the epoch is drawn (limit_train_batches): the
    # batches the workers had prefetched come next, not a new epoch
    reference = consume(make_dm(shards, num_workers=2, epoch_length=4), 8)
    dm = make_dm(shards, num_workers=2, epoch_length=4)
    seen = consume(dm, 1)
    rest = [fingerprint(b) for b in dm.train_dataloader()]
    assert len(rest) == 3
    seen += rest + [fingerprint(b) for b in dm.train_dataloader()]
    assert seen == reference


def test_mismatched_topology_reseeds(shards, caplog):
    first = make_dm(shards)
    consume(first, 2)
    second = make_dm(shards, num_workers=2)
    second.train_dataloader().load_state_dict(roundtrip(first.train_dataloader().state_dict()))
    with caplog.at_level(logging.WARNING, "segany.data"):
        resumed = consume(second, 2)
    assert "does not fit this run" in caplog.text
    fresh = consume(make_dm(shards, num_workers=2), 2)
    assert resumed != fresh  # not a replay of a fresh start


def test_shuffled_passes_visit_every_shard(shards):
    dm = make_dm(shards, resampled=False, interleave=1, epoch_length=10, jitter=False, flip=False)
    keys = [k for b in consume(dm, 10) for k, _ in b]
    assert sorted(keys) == sorted(f"sa_{100 * s + i}" for s in range(4) for i in range(5))  # one full pass


def _rank_main(rank, shards, store_path, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    try:
        dm = make_dm(shards)  # rank and world size from torch.distributed
        first = consume(dm, 2)
        state = dm.train_dataloader().state_dict()  # gathers every rank's position
        resumed = make_dm(shards)
        resumed.train_dataloader().load_state_dict(roundtrip(state))
        out.put((rank, first, [r["rank"] for r in state["ranks"]], consume(resumed, 2), consume(make_dm(shards), 4)))
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_gather_positions_and_resume_their_own(shards, tmp_path):
    ctx = torch.multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, shards, str(tmp_path / "store"), out)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    (_, first0, ranks0, resumed0, straight0), (_, first1, _, resumed1, straight1) = results
    assert ranks0 == [0, 1]
    assert first0 + resumed0 == straight0 and first1 + resumed1 == straight1  # each rank continues its own stream
    keys = lambda batches: {k for b in batches for k, _ in b}  # noqa: E731
    assert not keys(straight0) & keys(straight1)  # ranks read disjoint shards
