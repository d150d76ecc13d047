"""A hung rank (segany/callbacks/watchdog.py): one of two gloo ranks sleeps for good in its
third training step; both processes dump their Python stacks and exit within the timeout,
and the report names the rank that hung. The collective timeout is set from the same key;
under SLURM the job is requeued (a stand-in `scontrol` records the call)."""

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from helpers import compose
from hydra.utils import instantiate

from segany.callbacks.watchdog import EXIT_CODE, HangWatchdog, summary

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT, GRACE = 10, 5
SMALL = [
    "logger=csv",
    "data.num_train=8",
    "data.num_val=4",
    "data.shard_size=2",
    "data.max_masks=2",
    "data.batch_size=1",
    "data.num_workers=0",
    "trainer.limit_val_batches=0",
    "callbacks.checkpoint.every_n_train_steps=100",
    "prompting.point_rounds=1",
    "prompting.mask_rounds=1",
]


def _running(pid: int) -> bool:
    """Whether process `pid` runs (an exited rank 1, orphaned by rank 0, may stay a zombie until
    init reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_a_hung_rank_is_named_and_every_rank_dumps_and_exits(tmp_path):
    env = dict(os.environ, WANDB_MODE="offline", HYDRA_FULL_ERROR="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "train.py", f"paths.root_dir={tmp_path}", f"data.root={tmp_path}/data", *SMALL]
    cmd += ["strategy=ddp", "trainer.devices=2", "trainer.max_steps=5", f"hang_timeout_s={TIMEOUT}"]
    cmd += [
        f"callbacks.watchdog.grace_s={GRACE}",
        "+callbacks.hang._target_=tests._kill.HangAt",
        "+callbacks.hang.step=2",
    ]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    ended = time.time()
    out = p.stdout + p.stderr
    assert p.returncode == EXIT_CODE, out[-4000:]
    assert "rank(s) [1] hung (not in a collective) while rank(s) [0] wait for them" in out, out[-4000:]
    assert "hang watchdog: rank 0: Python stacks follow" in out and "hang watchdog: rank 1: Python stacks follow" in out

    (hangs,) = (tmp_path / "demo" / "hangs").iterdir()
    reports = {r: json.loads((hangs / f"rank{r}.json").read_text()) for r in (0, 1)}
    hung, waiting = reports[1], reports[0]
    assert not hung["waiting"] and hung["at"].endswith("in on_train_batch_start") and "_kill.py" in hung["at"]
    assert waiting["waiting"] and waiting["call"].startswith("in a collective: "), waiting  # DDP's or ours
    assert {r["step"] for r in reports.values()} == {2}
    for r in reports.values():  # fired on time, not at the collective timeout (5 min later)
        assert TIMEOUT <= r["seconds"] < TIMEOUT + 3, r
    assert ended - (hangs / "rank1.json").stat().st_mtime < GRACE + 5  # and exited soon after
    assert "in on_train_batch_start" in (hangs / "rank1.stack").read_text()  # faulthandler's dump
    assert waiting["call"].rsplit("(", 1)[1].split(":")[0] in (hangs / "rank0.stack").read_text()
    assert not any(_running(r["pid"]) for r in reports.values())  # both processes are gone
    assert not (hangs / "requeued").exists()  # not a SLURM job


def test_the_collective_timeout_follows_the_watchdog():
    for strategy in ("ddp", "fsdp"):
        cfg = compose(f"strategy={strategy}", "hang_timeout_s=60")
        assert cfg.callbacks.watchdog.timeout_s == 60
        assert instantiate(cfg.trainer.strategy.timeout) == datetime.timedelta(seconds=60 + 300)
    assert compose().callbacks.watchdog.timeout_s == 1500  # strategy=default (Lightning's timeout: 30 min)


def test_requeue_under_slurm_at_most_max_requeues(tmp_path, monkeypatch):
    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    dog = HangWatchdog(timeout_s=1, max_requeues=2)
    for start in ("a", "b", "c"):  # three hangs in one run directory: two requeues
        dog.dir = tmp_path / "hangs" / start
        dog.dir.mkdir(parents=True)
        dog._requeue()
    assert calls.read_text().splitlines() == ["requeue 4242", "requeue 4242"]
    assert sorted(p.parent.name for p in (tmp_path / "hangs").glob("*/requeued")) == ["a", "b"]


def _report(rank, progress):
    return dict(rank=rank, host="h", pid=rank, step=progress[0], phase="p", progress=list(progress), seconds=12.0)


def test_summary_names_the_ranks_behind_when_none_is_seen_in_a_collective():
    """Under NCCL a rank waiting for a peer blocks later in the step (its next GPU
    synchronisation), not in the collective: the rank that hung is the one behind."""
    reports = [_report(0, (7, 7, 3)), _report(1, (7, 7, 1)), _report(2, (8, 7, 4))]
    for r in reports:
        r.update(waiting=False, call=None, at="train.py:1 in f")
    text = summary(reports, world_size=4, timeout_s=10)
    assert text.splitlines()[0] == (
        "hang: no training progress for 10 s; rank(s) [1] are behind the others (the ranks that hung, "
        "most likely); no report from rank(s) [3]: dead, stuck holding the GIL, or not on this file system"
    )
    assert text.splitlines()[2] == "  rank 1 (h pid 1): step 7, p for 12 s, at train.py:1 in f"


def test_an_exception_out_of_fit_stops_the_watchdog(tmp_path):
    """Lightning calls no teardown hook after an exception; a caller that catches it (a test, a
    notebook) must not be killed a timeout later."""
    trainer = SimpleNamespace(global_step=0, global_rank=0, world_size=1, default_root_dir=str(tmp_path))
    trainer.strategy = SimpleNamespace(broadcast=lambda x: x)
    dog = HangWatchdog(timeout_s=1, grace_s=0)
    dog.on_train_start(trainer, None)
    thread = dog._thread
    dog.on_exception(trainer, None, RuntimeError("out of fit"))
    thread.join(timeout=5)
    assert not thread.is_alive()
    time.sleep(1.5)  # past the deadline, still alive, and no report
    assert not list(tmp_path.rglob("rank0.json"))
