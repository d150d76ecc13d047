"""Verified checkpoints, retention and full disks.

Every checkpoint train.py writes carries a manifest (sizes + hashes of its files); a damaged
newest checkpoint (a flipped byte, a truncation, a deleted DCP shard) is skipped by
resume=auto, which resumes from the newest one that verifies and logs why; evaluate.py and
export refuse it naming the file. Retention keeps exactly what callbacks.checkpoint.save_top_k
and callbacks.checkpoint_kept.every_n_train_steps say. A write that runs out of space (a mocked
ENOSPC, and a real 1 MiB tmpfs when this runs as root) leaves the previous checkpoint
bit-identical and stops with a message naming the directory and the bytes needed and free."""

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from helpers import run_train
from omegaconf import OmegaConf

import segany
from segany.modeling.checkpoint import CheckpointError, read_checkpoint, verify_checkpoint
from segany.training.checkpointing import AtomicCheckpointIO, AtomicModelParallelStrategy, DiskFullError

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
    "data.num_workers=0",
    "trainer.check_val_every_n_epoch=100",
    "callbacks.time_budget=null",
    # retention: a checkpoint every step, the newest 2 kept, every 3rd kept for good
    "callbacks.checkpoint.every_n_train_steps=1",
    "callbacks.checkpoint.save_top_k=2",
    "callbacks.checkpoint_kept.every_n_train_steps=3",
]
LOG = "segany.training.checkpointing"


def _train(root, data, *args, expect_rc=0):
    p = run_train(f"paths.root_dir={root}", f"data.root={data}", *SMALL, *args, expect_rc=expect_rc)
    return p.stdout + p.stderr


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _flip(path, at=0.5):
    """Flip one bit in the middle of the file (inside tensor data: torch.load still succeeds)."""
    with open(path, "r+b") as f:
        f.seek(int(os.path.getsize(path) * at))
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x10]))


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _resume_cfg(run_dir, resume="auto"):
    return OmegaConf.create({"resume": resume, "paths": {"run_dir": str(run_dir)}})


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 6-step demo run; each test works on a copy of its run directory (mtimes kept)."""
    root = tmp_path_factory.mktemp("base")
    _train(root / "runs", root / "data", "trainer.max_steps=6")
    return root / "runs" / "demo"


def _data(base):
    return base.parent.parent / "data"


@pytest.fixture
def run(base, tmp_path):
    shutil.copytree(base, tmp_path / "runs" / "demo", symlinks=True)
    return tmp_path / "runs" / "demo"


def test_retention_keeps_exactly_what_the_keys_say_and_every_checkpoint_verifies(base):
    ckpts = base / "checkpoints"
    names = sorted(p.name for p in ckpts.iterdir() if p.is_file())
    kept = ("last.ckpt", "step0000005.ckpt", "step0000006.ckpt")
    assert names == sorted(f"{n}{suffix}" for n in kept for suffix in ("", ".manifest.json"))
    assert sorted(p.name for p in (ckpts / "kept").iterdir()) == sorted(
        f"step000000{s}.ckpt{suffix}" for s in (3, 6) for suffix in ("", ".manifest.json")
    )
    for ckpt in [*ckpts.glob("*.ckpt"), *ckpts.glob("kept/*.ckpt")]:
        assert verify_checkpoint(ckpt)
        step = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
        assert ckpt.name == "last.ckpt" or ckpt.name == f"step{step:07d}.ckpt"
    # the manifest against an independent reading of the file: its size, and the hash it names
    manifest = json.loads((ckpts / "last.ckpt.manifest.json").read_text())
    entry = manifest["files"]["last.ckpt"]
    data = (ckpts / "last.ckpt").read_bytes()
    if manifest["algorithm"] == "xxh3_128":
        import xxhash

        assert entry["hash"] == xxhash.xxh3_128(data).hexdigest()
    else:
        assert entry["hash"] == hashlib.new(manifest["algorithm"], data).hexdigest()
    assert entry["size"] == len(data)


@pytest.mark.parametrize("damage", [_flip, _truncate])
def test_resume_auto_walks_back_to_the_newest_checkpoint_that_verifies(run, damage, caplog):
    ckpts = run / "checkpoints"
    damaged = [ckpts / "last.ckpt", ckpts / "step0000006.ckpt", ckpts / "kept" / "step0000006.ckpt"]
    sizes = {path: os.path.getsize(path) for path in damaged}
    for path in damaged:  # every checkpoint of step 6
        damage(path)
    with caplog.at_level(logging.INFO, logger=LOG):
        assert train.resume_path(_resume_cfg(run)) == str(ckpts / "step0000005.ckpt")
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skipped) == 3
    for path in damaged:
        (line,) = [m for m in skipped if m.startswith(f"resume: skipping {path},")]
        if damage is _truncate:
            assert f"{path}: {sizes[path] // 2} bytes, the manifest says {sizes[path]}" in line
        else:
            assert re.search(rf"{re.escape(str(path))}: (xxh3_128|sha256) \w+, the manifest says \w+", line)
    # an explicit resume=PATH of a damaged one is refused, naming it
    with pytest.raises(CheckpointError, match="last.ckpt.*does not match its manifest"):
        train.resume_path(_resume_cfg(run, resume=str(ckpts / "last.ckpt")))


def test_every_checkpoint_damaged_is_an_error_listing_each(run):
    for path in [*run.glob("checkpoints/*.ckpt"), *run.glob("checkpoints/kept/*.ckpt")]:
        _flip(path)
    with pytest.raises(CheckpointError, match="no checkpoint matches its manifest") as e:
        train.resume_path(_resume_cfg(run))
    assert str(e.value).count("the manifest says") == 5 and "resume=null" in str(e.value)


def test_checkpoint_without_manifest_is_taken_with_a_log_line(run, caplog):
    last = run / "checkpoints" / "last.ckpt"
    (run / "checkpoints" / "last.ckpt.manifest.json").unlink()
    with caplog.at_level(logging.INFO, logger=LOG):
        assert train.resume_path(_resume_cfg(run)) == str(last)
    assert f"{last} has no manifest" in caplog.text
    assert not verify_checkpoint(last)  # accepted, unverified


def test_train_py_resumes_from_the_previous_checkpoint_past_a_flipped_bit(base, run):
    """A flipped bit in last.ckpt's tensor data still unpickles (it would resume from
    garbage); resume=auto skips it, resumes from a periodic checkpoint of step 6, runs on."""
    ckpts = run / "checkpoints"
    _flip(ckpts / "last.ckpt")
    out = _train(run.parent, _data(base), "trainer.max_steps=7")
    assert f"resume: skipping {ckpts / 'last.ckpt'}, it does not match its manifest" in out
    resumed = Path(re.search(r"resuming from (\S+)", out).group(1))
    assert resumed in (ckpts / "step0000006.ckpt", ckpts / "kept" / "step0000006.ckpt")
    assert torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 7
    assert verify_checkpoint(ckpts / "last.ckpt")


def test_evaluate_and_export_refuse_a_damaged_checkpoint_naming_the_file(run, tmp_path, capsys):
    last = run / "checkpoints" / "last.ckpt"
    _flip(last)
    from segany.export import main as export_main

    out = tmp_path / "sam.pth"
    assert export_main([str(last), str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{last}: " in err and "does not match its manifest" in err and not out.exists()

    from helpers import compose

    import evaluate as evaluate_script

    cfg = compose(f"checkpoint={last}", f"output_dir={tmp_path}/eval", f"paths.root_dir={tmp_path}", name="evaluate")
    with pytest.raises(CheckpointError, match=f"{last}: xxh3_128|{last}: sha256"):
        evaluate_script.evaluate(cfg)
    assert not (tmp_path / "eval" / "metrics.json").exists()


# ----------------------------------------------------------------- sharded (DCP) checkpoints


def _weights():
    torch.manual_seed(0)
    return {"model." + k: v for k, v in segany.build_sam("vit_tiny").state_dict().items()}


def _strategy():
    """Lightning's ModelParallelStrategy as segany configures it, in one process (no process group:
    its broadcast / barrier / reduce are the identity)."""
    s = AtomicModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1, save_distributed_checkpoint=True)
    s.parallel_devices = [torch.device("cpu")]
    return s


def _save_dcp(strategy, path, step):
    config = {"model": {"_target_": "segany.build_sam", "variant": "vit_tiny"}}
    state = {"state_dict": _weights(), "optimizer_states": [], "global_step": step, "segany_config": config}
    strategy.save_checkpoint(state, path)


def _tree(d):
    return {p.name: _sha(p) for p in Path(d).iterdir()}


def test_sharded_checkpoint_manifest_per_file_and_a_deleted_shard(tmp_path, caplog, capsys):
    ckpts = tmp_path / "checkpoints"
    s = _strategy()
    _save_dcp(s, ckpts / "step0000002.ckpt", 2)
    _save_dcp(s, ckpts / "last.ckpt", 4)
    last = ckpts / "last.ckpt"
    files = json.loads((last / "manifest.json").read_text())["files"]
    on_disk = {p.name: p.stat().st_size for p in last.iterdir() if p.name != "manifest.json"}
    assert {k: v["size"] for k, v in files.items()} == on_disk and {".metadata", "meta.pt"} < on_disk.keys()
    assert read_checkpoint(last).step == 4
    (shard,) = last.glob("*.distcp")
    shard.unlink()
    with caplog.at_level(logging.INFO, logger=LOG):
        assert train.resume_path(_resume_cfg(tmp_path)) == str(ckpts / "step0000002.ckpt")
    assert f"{shard}: missing (the manifest lists {files[shard.name]['size']} bytes)" in caplog.text
    with pytest.raises(CheckpointError, match=f"{shard}: missing"):
        read_checkpoint(last)
    from segany.export import main as export_main

    assert export_main([str(last), str(tmp_path / "x.pth"), "--variant", "vit_tiny"]) == 2
    assert f"{shard}: missing" in capsys.readouterr().err


def test_interrupted_swap_old_directory_is_a_candidate(tmp_path):
    ckpts = tmp_path / "checkpoints"
    _save_dcp(_strategy(), ckpts / "last.ckpt", 4)
    os.replace(ckpts / "last.ckpt", ckpts / "last.ckpt.old")  # killed between replace_dir's two renames
    assert train.resume_path(_resume_cfg(tmp_path)) == str(ckpts / "last.ckpt.old")


# two gloo ranks, each writing its own shard of a DTensor; `fail` = "meta.pt" makes rank 0's
# write of Lightning's meta.pt (after the collective save, on rank 0 alone) hit ENOSPC
TWO_RANKS = """
import errno, os, sys, datetime
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from lightning_fabric.plugins.environments import LightningEnvironment
import pytorch_lightning.strategies.model_parallel as mp
from segany.training.checkpointing import AtomicModelParallelStrategy, DiskFullError

rank, path, fail = int(os.environ["RANK"]), sys.argv[1], sys.argv[2]
dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
env = LightningEnvironment()
env.set_global_rank(rank)
env.set_world_size(2)
s = AtomicModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
s.cluster_environment = env
s.parallel_devices = [torch.device("cpu")] * 2
mesh = init_device_mesh("cpu", (2,))
w = distribute_tensor(torch.arange(4096.0).reshape(64, 64), mesh, [Shard(0)])
if fail == "meta.pt" and rank == 0:
    real_save = torch.save
    def save(obj, f, *a, **k):
        if str(f).endswith("meta.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)
    mp.torch.save = save
try:
    s.save_checkpoint({"state_dict": {"w": w}, "optimizer_states": [], "global_step": 1}, path)
    print("saved")
except DiskFullError as e:
    print("DiskFullError:", e)
"""


def _two_ranks(tmp_path, path, fail):
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000), WORLD_SIZE="2")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(path), fail],
            cwd=ROOT,
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r), OMP_NUM_THREADS="1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    return [o[0] for o in outs]


def test_two_ranks_one_manifest_entry_per_shard_and_a_full_disk_on_one_rank(tmp_path):
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert _two_ranks(tmp_path, last, "none") == ["saved\n", "saved\n"]
    files = json.loads((last / "manifest.json").read_text())["files"]
    assert sorted(files) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    assert verify_checkpoint(last)
    before = _tree(last)
    # rank 0 alone runs out of space (meta.pt): both ranks stop with the message, none waits forever
    outs = _two_ranks(tmp_path, last, "meta.pt")
    for out in outs:
        assert out.startswith(f"DiskFullError: [Errno 28] no space left in {last.parent} for checkpoint last.ckpt")
        assert f"needs at least {4096 * 4} bytes" in out  # both ranks' halves of the 64x64 fp32 tensor
    assert _tree(last) == before and not (last.parent / "last.ckpt.tmp").exists()


# ----------------------------------------------------------------- disk full


def _tensor_bytes(state):
    return sum(v.numel() * v.element_size() for v in state.values())


def test_enospc_mid_write_keeps_the_previous_file_and_names_the_directory(tmp_path, monkeypatch):
    from segany.modeling.checkpoint import manifest

    io, last = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.arange(1000.0)}, "global_step": 1}, last)
    before = _sha(last), _sha(str(last) + ".manifest.json")
    real_write, budget = manifest._HashingWriter.write, [20_000]

    def write(self, data):  # the disk fills 20 kB into the new checkpoint
        n = memoryview(data).nbytes
        if n > budget[0]:
            real_write(self, bytes(memoryview(data)[: budget[0]]))
            raise OSError(errno.ENOSPC, "No space left on device")
        budget[0] -= n
        return real_write(self, data)

    monkeypatch.setattr(manifest._HashingWriter, "write", write)
    new = {"state_dict": {"w": torch.zeros(100_000), "b": torch.zeros(10, dtype=torch.float64)}, "global_step": 2}
    with pytest.raises(DiskFullError) as e:
        io.save_checkpoint(new, last)
    free = shutil.disk_usage(last.parent).free
    assert e.value.errno == errno.ENOSPC
    msg = str(e.value)
    assert f"no space left in {last.parent} for checkpoint last.ckpt" in msg
    assert f"needs at least {100_000 * 4 + 10 * 8} bytes" in msg
    reported = int(re.search(r", (\d+) bytes \([\d.]+ GiB\) are free", msg).group(1))
    assert abs(reported - free) < 2**24  # the free bytes there when it was raised
    assert (_sha(last), _sha(str(last) + ".manifest.json")) == before and verify_checkpoint(last)
    assert torch.load(last, weights_only=True)["global_step"] == 1
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt", "last.ckpt.manifest.json"]


def test_enospc_in_a_sharded_write_keeps_the_previous_directory(tmp_path, monkeypatch):
    import pytorch_lightning.strategies.model_parallel as mp
    from torch.distributed.checkpoint.api import CheckpointException

    s, last = _strategy(), tmp_path / "checkpoints" / "last.ckpt"
    _save_dcp(s, last, 2)
    before = _tree(last)

    def dcp_save(state, path):  # one shard half written, then the library reports the rank's ENOSPC
        (Path(path) / "__0_0.distcp").write_bytes(b"x" * 1000)
        err = OSError(errno.ENOSPC, "No space left on device")
        raise CheckpointException("write", {0: (err, traceback.StackSummary())})

    monkeypatch.setattr(mp, "_distributed_checkpoint_save", dcp_save)
    with pytest.raises(DiskFullError, match=f"no space left in {last.parent} for checkpoint last.ckpt") as e:
        _save_dcp(s, last, 4)
    assert f"needs at least {_tensor_bytes(_weights())} bytes" in str(e.value)
    assert _tree(last) == before and verify_checkpoint(last) and read_checkpoint(last).step == 2
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # last.ckpt.tmp removed


@pytest.fixture
def tmpfs(tmp_path):
    """A tmpfs of 1 MiB mounted at tmp_path/fs (root only); unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode:
        pytest.skip(f"mount -t tmpfs failed: {p.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_enospc_on_a_real_full_tmpfs(tmpfs):
    io, last = AtomicCheckpointIO(), tmpfs / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(75_000)}, "global_step": 1}, last)  # 300 kB of 1 MiB
    before = _sha(last)
    with pytest.raises(DiskFullError, match=f"no space left in {last.parent} for checkpoint last.ckpt") as e:
        io.save_checkpoint({"state_dict": {"w": torch.zeros(200_000)}, "global_step": 2}, last)  # 800 kB more
    assert f"needs at least {800_000} bytes" in str(e.value)
    assert f"{shutil.disk_usage(tmpfs).free} bytes" in str(e.value)
    assert _sha(last) == before and verify_checkpoint(last)
    assert torch.load(last, weights_only=True)["global_step"] == 1
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt", "last.ckpt.manifest.json"]


def test_train_py_stops_on_a_full_disk_and_last_ckpt_stays(base, tmpfs):
    """The 6-step run copied onto a tmpfs with room for half a checkpoint more: resuming to
    step 7 stops at step 7's checkpoint with the message; last.ckpt is bit-identical."""
    run = tmpfs / "runs" / "demo"
    subprocess.run(["mount", "-o", "remount,size=512m", str(tmpfs)], check=True)
    shutil.copytree(base, run, symlinks=True)
    last = run / "checkpoints" / "last.ckpt"
    used, size = shutil.disk_usage(tmpfs).used, os.path.getsize(last)
    subprocess.run(["mount", "-o", f"remount,size={used + size // 2}", str(tmpfs)], check=True)
    before = _sha(last)
    out = _train(tmpfs / "runs", _data(base), "trainer.max_steps=7", expect_rc=1)
    free = r"it needs at least \d+ bytes \([\d.]+ GiB\) beside the previous one, \d+ bytes \([\d.]+ GiB\) are free"
    assert f"no space left in {run / 'checkpoints'} for checkpoint step0000007.ckpt" in out and re.search(free, out)
    assert _sha(last) == before and verify_checkpoint(last)
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 6
    assert not [p for p in (run / "checkpoints").iterdir() if ".tmp" in p.name]
