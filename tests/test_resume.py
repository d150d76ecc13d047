"""Exact resume after preemption, atomic checkpoint writes, global batch, resume selection."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import run_train
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

SMALL = [
    "logger=csv",
    "data.num_train=16",
    "data.num_val=4",
    "data.shard_size=4",
    "data.max_masks=4",
    "data.batch_size=2",
    "trainer.check_val_every_n_epoch=1",
    "trainer.limit_val_batches=1",
    "callbacks.checkpoint.every_n_train_steps=3",
    "model.decoder_dropout=0.1",
    "model.drop_path_rate=0.1",
]


def _train(root, *args, expect_rc=0):
    return run_train(f"paths.root_dir={root}", f"data.root={root}/../data", *SMALL, *args, expect_rc=expect_rc)


def _state(ckpt):
    c = torch.load(ckpt, map_location="cpu", weights_only=False)
    return c["global_step"], c["state_dict"], c["optimizer_states"][0]["state"]


@pytest.mark.parametrize("workers", [pytest.param(0, marks=pytest.mark.slow), 1])  # 0: same path, slow
def test_kill_and_resume_is_bit_identical(tmp_path, workers):
    """6 steps straight vs 3 steps, SIGKILL at the start of step 4, resume (resume=auto) to 6:
    the same weights and optimiser state, bit for bit (dropout, drop path and prompt
    sampling on; validation in between; data loader workers or not)."""
    w = f"data.num_workers={workers}"
    _train(tmp_path / "a", "trainer.max_steps=6", w)
    _train(
        tmp_path / "b",
        "trainer.max_steps=6",
        w,
        "+callbacks.kill._target_=tests._kill.KillAt",
        "+callbacks.kill.step=4",
        expect_rc=-9,
    )
    last = tmp_path / "b" / "demo" / "checkpoints" / "last.ckpt"
    assert _state(last)[0] == 3
    p = _train(tmp_path / "b", "trainer.max_steps=6", w)
    assert "resuming from" in p.stderr + p.stdout
    _assert_same_state(tmp_path / "a" / "demo" / "checkpoints" / "last.ckpt", last, steps=6)


def _assert_same_state(a, b, steps):
    sa, wa, oa = _state(a)
    sb, wb, ob = _state(b)
    assert sa == sb == steps
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    for i in oa:
        for k in oa[i]:
            assert torch.equal(oa[i][k], ob[i][k]), (i, k)


def test_dead_worker_names_its_sample_and_resume_is_bit_identical(tmp_path):
    """The data-loader worker SIGKILLs itself while decoding its 11th sample (batch 6, read
    ahead during step 4-5, after the checkpoint at step 3): the run fails with an error naming
    that sample's shard and key; the same command then resumes from step 3 and ends
    bit-identical to an uninterrupted run (nothing replayed, nothing skipped)."""
    w = "data.num_workers=1"
    _train(tmp_path / "a", "trainer.max_steps=6", w)
    marker = tmp_path / "died"
    dying = ["data._target_=tests._kill.DyingSynthetic", "+data.die_at=11", f"+data.marker={marker}"]
    p = _train(tmp_path / "b", "trainer.max_steps=6", w, *dying, expect_rc=1)
    shard, key = marker.read_text().split()
    assert "data-loader worker 0 of rank 0 (pid " in p.stderr, p.stderr[-3000:]
    assert f"died while decoding shard {shard} key {key} (epoch sample 11)" in p.stderr, p.stderr[-3000:]
    last = tmp_path / "b" / "demo" / "checkpoints" / "last.ckpt"
    assert _state(last)[0] == 3
    p = _train(tmp_path / "b", "trainer.max_steps=6", w, *dying)  # the marker is there: no death
    assert "resuming from" in p.stderr + p.stdout
    _assert_same_state(tmp_path / "a" / "demo" / "checkpoints" / "last.ckpt", last, steps=6)


def test_sigkill_during_a_checkpoint_write_leaves_last_loadable(tmp_path):
    """The process writes one checkpoint, then is killed half-way through writing the next
    one to the same path: the first is still there, whole."""
    script = textwrap.dedent(f"""
        import os, signal, torch
        from segany.training.checkpointing import AtomicCheckpointIO
        io = AtomicCheckpointIO()
        path = {str(tmp_path / "last.ckpt")!r}
        io.save_checkpoint({{"step": 1, "w": torch.arange(100000.)}}, path)
        real_save = torch.save
        def dying_save(obj, f, *a, **k):
            f.write(b"PK" + b"x" * 4096)   # part of a zip archive, then the node dies
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        io.save_checkpoint({{"step": 2, "w": torch.zeros(100000)}}, path)
    """)
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == -9, p.stderr
    c = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert c["step"] == 1 and torch.equal(c["w"], torch.arange(100000.0))
    leftovers = [f.name for f in tmp_path.iterdir() if f.name not in ("last.ckpt", "last.ckpt.manifest.json")]
    assert all(".tmp" in f for f in leftovers)  # the partial write never took the name
    from segany.modeling.checkpoint import verify_checkpoint

    assert verify_checkpoint(tmp_path / "last.ckpt")  # and its manifest is still the first one's


def test_interrupted_directory_swap_falls_back_to_the_old_one(tmp_path):
    from segany.training.checkpointing import replace_dir, resolve_checkpoint

    last, tmp = tmp_path / "last.ckpt", tmp_path / "last.ckpt.tmp"
    last.mkdir(), tmp.mkdir()
    (last / "a").write_text("old"), (tmp / "a").write_text("new")
    replace_dir(tmp, last)
    assert (last / "a").read_text() == "new" and not tmp.exists()
    assert not (tmp_path / "last.ckpt.old").exists()
    os.replace(last, tmp_path / "last.ckpt.old")  # killed between the two renames
    assert resolve_checkpoint(last) == str(tmp_path / "last.ckpt.old")


def _cfg(**kw):
    base = {"global_batch": 256, "data": {"batch_size": 1}, "trainer": {}}
    base.update(kw)
    return OmegaConf.create(base)


@pytest.mark.parametrize("world,batch,acc", [(256, 1, 1), (64, 1, 4), (8, 2, 16), (1, 4, 64)])
def test_global_batch_is_kept_by_accumulation(world, batch, acc):
    trainer = SimpleNamespace(world_size=world, accumulate_grad_batches=1)
    train.apply_global_batch(_cfg(data={"batch_size": batch}), trainer)
    assert trainer.accumulate_grad_batches == acc and batch * world * acc == 256


def test_global_batch_that_cannot_be_met_fails_naming_the_keys():
    with pytest.raises(ValueError, match=r"global_batch=256 cannot be met.*batch_size=1 x world size 24"):
        train.apply_global_batch(_cfg(), SimpleNamespace(world_size=24, accumulate_grad_batches=1))
    with pytest.raises(ValueError, match="accumulate_grad_batches=2 contradicts"):
        train.apply_global_batch(
            _cfg(trainer={"accumulate_grad_batches": 2}), SimpleNamespace(world_size=8, accumulate_grad_batches=1)
        )


def test_resume_auto_takes_the_newest_checkpoint(tmp_path):
    cfg = OmegaConf.create({"resume": "auto", "paths": {"run_dir": str(tmp_path)}})
    assert train.resume_path(cfg) is None
    (tmp_path / "checkpoints").mkdir()
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.write_bytes(b"x")
    assert train.resume_path(cfg) == str(last)
    hpc = tmp_path / "hpc_ckpt_1.ckpt"  # written by Lightning on a SLURM requeue signal
    hpc.write_bytes(b"x")
    os.utime(hpc, (time.time() + 5, time.time() + 5))
    assert train.resume_path(cfg) == str(hpc)
    with pytest.raises(FileNotFoundError, match="resume=last"):
        train.resume_path(OmegaConf.create({"resume": "last", "paths": {"run_dir": str(tmp_path / "none")}}))
