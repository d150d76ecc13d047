"""slurm/train.sbatch on a real single-node SLURM cluster started by the test (tests/slurm_cluster.py).

Needs Debian's slurm-wlm and munge (installed by .ci/run) and root. Without them, or when
the daemons do not come up within 30 s, the tests are skipped with the reason (printed in
pytest's summary with -rs, which .ci/run passes), never passed.

The script's #SBATCH lines ask for 8 GPUs x 8 tasks x 12 CPUs and 48 h; the command-line
options in CPU_NODE override them for this CPU-only node, as a user would. The jobs run
this interpreter (PATH) with one thread each.
"""

import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_cluster import LocalSlurm, SlurmUnavailable  # noqa: E402

CPU_NODE = ["--gpus-per-node=0", "--ntasks-per-node=1", "--cpus-per-task=1", "--mem=0"]
FINAL = (
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start(timeout=30)
    except (SlurmUnavailable, OSError) as e:
        reason = f"SLURM cannot run here: {e}"
        print(reason, file=sys.stderr)
        pytest.skip(reason)
    env = {
        k: v
        for k, v in cluster.env.items()  # nothing from an enclosing SLURM job
        if k == "SLURM_CONF" or not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))
    }
    env.update(
        PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
        SEGANY_HOME=str(ROOT),
        OMP_NUM_THREADS="1",
        WANDB_MODE="offline",
        HYDRA_FULL_ERROR="1",
    )
    env.pop("SEGANY_RUNS", None)
    cluster.env = env
    yield cluster
    cluster.stop()


def _overrides(tmp, *extra):
    return [
        "experiment=demo",
        f"paths.root_dir={tmp}/runs",
        f"data.root={tmp}/data",
        "logger=csv",
        "data.num_train=8",
        "data.num_val=4",
        "data.shard_size=4",
        "data.num_workers=0",
        *extra,
    ]


def _sbatch(slurm, tmp, *args, sbatch_opts=(), wait=False, timeout=30):
    p = slurm.run(
        "sbatch",
        "--parsable",
        *(["--wait"] if wait else []),
        f"--output={tmp}/%x-%j.out",
        f"--error={tmp}/%x-%j.out",
        *CPU_NODE,
        *sbatch_opts,
        "slurm/train.sbatch",
        *args,
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )
    m = re.match(r"(\d+)", p.stdout.strip())
    assert m, f"sbatch failed ({p.returncode}): {p.stdout}{p.stderr}"
    return m.group(1), p


def _out(tmp, job):
    f = Path(tmp) / f"segany-{job}.out"
    return f.read_text(errors="replace") if f.exists() else ""


def _step(ckpt):
    return torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]


def _wait_for(slurm, tmp, job, cond, timeout, what):
    t0 = time.time()
    while not cond(info := slurm.job(job)):
        assert info["JobState"] not in FINAL, f"job {job} {info['JobState']} before {what}:\n{_out(tmp, job)[-4000:]}"
        assert time.time() - t0 < timeout, (
            f"job {job}: no {what} after {timeout} s ({info['JobState']}):\n{_out(tmp, job)[-4000:]}"
        )
        time.sleep(0.5)
    return info


def _check_requeued_and_resumed(slurm, tmp, job, steps):
    info = _wait_for(slurm, tmp, job, lambda i: i["JobState"] in FINAL, 240, "end")
    log = _out(tmp, job)
    run_dir = Path(tmp) / "runs" / f"demo_{job}"
    assert info["JobState"] == "COMPLETED", f"{info}\n{log[-4000:]}"
    assert info["Restarts"] == "1", info
    assert f"job {job} (restart 0)" in log and f"job {job} (restart 1)" in log, log[-4000:]
    first, second = log.split(f"job {job} (restart 1)")
    assert f"Requeued SLURM job: {job}" in first, first[-3000:]  # Lightning's `scontrol requeue`
    hpc = run_dir / "hpc_ckpt_1.ckpt"  # saved by Lightning on USR1
    # the second start resumes in the same run dir from the newest checkpoint: the hpc one, or
    # last.ckpt when a periodic save landed between the signal and the requeue's kill
    resumed = re.search(r"resuming from (\S+)", second)
    assert resumed and Path(resumed.group(1)) in (hpc, run_dir / "checkpoints" / "last.ckpt"), second[-3000:]
    last = _step(run_dir / "checkpoints" / "last.ckpt")
    assert 0 < _step(hpc) < last and (steps is None or last == steps), (_step(hpc), last, steps)
    assert [d.name for d in (Path(tmp) / "runs").iterdir()] == [f"demo_{job}"]  # one run directory


def test_sbatch_demo_runs_to_completion(slurm, tmp_path):
    job, p = _sbatch(slurm, tmp_path, *_overrides(tmp_path, "trainer.max_steps=3"), wait=True, timeout=300)
    log = _out(tmp_path, job)
    assert p.returncode == 0, f"job {job} exit {p.returncode}: {p.stderr}\n{log[-4000:]}"
    run_dir = tmp_path / "runs" / f"demo_{job}"  # paths.run_dir: <name>_<SLURM job id>
    assert _step(run_dir / "checkpoints" / "last.ckpt") == 3, log[-3000:]
    assert (run_dir / "config.yaml").is_file()
    assert slurm.job(job)["JobState"] == "COMPLETED"
    assert f"job {job} (restart 0) on 1 node(s) x 1 task(s)" in log
    assert "SLURM auto-requeueing enabled" in log  # Lightning took it for a SLURM-managed run


def test_signalled_job_requeues_and_resumes(slurm, tmp_path):
    """USR1 to the job's steps (what `--signal=USR1@90` sends before the time limit):
    Lightning saves hpc_ckpt_1.ckpt in the run directory and runs `scontrol requeue`; the
    job starts again with the same id, so in the same run directory, resumes from that
    checkpoint and finishes."""
    steps = 12
    job, _ = _sbatch(
        slurm,
        tmp_path,
        *_overrides(
            tmp_path,
            f"trainer.max_steps={steps}",
            "data.batch_size=1",
            "data.max_masks=2",
            "trainer.limit_val_batches=0",
            "callbacks.checkpoint.every_n_train_steps=2",
        ),
    )
    ckpts = tmp_path / "runs" / f"demo_{job}" / "checkpoints"
    _wait_for(slurm, tmp_path, job, lambda i: list(ckpts.glob("step*.ckpt")), 150, "checkpoint")  # training runs
    slurm.run("scancel", "--signal=USR1", job)  # to the job's steps (srun'd train.py), not the shell
    _check_requeued_and_resumed(slurm, tmp_path, job, steps)


@pytest.mark.slow
def test_time_limit_signal_requeues_and_resumes(slurm, tmp_path):
    """The same through SLURM's own `--signal=USR1@<s>` before a real time limit: a 2-minute
    limit signals 50 s before it (slurmctld checks periodically: about 40-100 s in); once
    requeued, the limit is lifted so that the second start is not signalled too. Training
    stops at 150 s of training time (Lightning's max_time, kept across the restart), so the
    first start never finishes before the signal however fast the machine is."""
    job, _ = _sbatch(
        slurm,
        tmp_path,
        *_overrides(
            tmp_path,
            "trainer.max_steps=100000",
            "trainer.max_time=00:00:02:30",
            "data.batch_size=1",
            "data.max_masks=2",
            "trainer.limit_val_batches=0",
            "callbacks.checkpoint.every_n_train_steps=100000",
        ),
        sbatch_opts=["--time=2", "--signal=USR1@50"],
    )
    _wait_for(slurm, tmp_path, job, lambda i: i["Restarts"] == "1", 150, "requeue")
    slurm.run("scontrol", "update", f"JobId={job}", "TimeLimit=10")
    _check_requeued_and_resumed(slurm, tmp_path, job, None)


@pytest.mark.slow
def test_hung_rank_requeues_and_resumes(slurm, tmp_path):
    """Two tasks; rank 1 hangs at step 3 of the first start: after hang_timeout_s both ranks dump
    their stacks, rank 0 names rank 1 and runs `scontrol requeue`; the second start resumes from
    the step-2 checkpoint and finishes (about 2 minutes)."""
    job, _ = _sbatch(
        slurm,
        tmp_path,
        *_overrides(
            tmp_path,
            "trainer.max_steps=6",
            "data.batch_size=1",
            "data.max_masks=2",
            "trainer.limit_val_batches=0",
            "callbacks.checkpoint.every_n_train_steps=2",
            "strategy=ddp",
            "hang_timeout_s=10",
            "callbacks.watchdog.grace_s=5",
            "+callbacks.hang._target_=tests._kill.HangAt",
            "+callbacks.hang.step=3",
            "+callbacks.hang.rank=1",
            "+callbacks.hang.restart=0",
        ),
        sbatch_opts=["--ntasks-per-node=2"],
    )
    info = _wait_for(slurm, tmp_path, job, lambda i: i["JobState"] in FINAL, 300, "end")
    log = _out(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{log[-4000:]}"
    first, second = log.split(f"job {job} (restart 1)")
    assert "rank(s) [1] hung (not in a collective) while rank(s) [0] wait for them" in first, first[-4000:]
    assert f"requeueing SLURM job {job}" in first, first[-3000:]
    run_dir = Path(tmp_path) / "runs" / f"demo_{job}"
    assert f"resuming from {run_dir / 'checkpoints' / 'last.ckpt'}" in second, second[-3000:]
    assert _step(run_dir / "checkpoints" / "last.ckpt") == 6
    (hangs,) = (run_dir / "hangs").iterdir()  # one hang, two reports, requeued once
    assert sorted(p.name for p in hangs.iterdir()) == sorted(
        ["rank0.json", "rank0.stack", "rank1.json", "rank1.stack", "requeued"]
    )
