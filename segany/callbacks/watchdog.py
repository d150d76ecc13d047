"""HangWatchdog: a rank that makes no training progress for `timeout_s` is hung; then every
rank dumps its Python stacks, says where it waits, the job exits (code EXIT_CODE) and, under
SLURM, is requeued, to resume from its last checkpoint (resume=auto).

Why hand-written: the process group's collective timeout (configs/strategy: `timeout`, a
few minutes after this one) fires only on the ranks that wait in a collective, and their
error does not say which peer is missing; the rank that hung (stuck in a read from a file
system, a kernel, a deadlock) is never told. faulthandler's `dump_traceback_later` dumps one
process's stacks, but cannot say which rank is the odd one out, nor requeue the job.

How: the training hooks (batch start, backward, optimiser step, batch end, validation
batches, checkpoint saves) push a deadline forward; a daemon thread watches it. When it
passes, on each rank:
  1. a report (step, phase, seconds without progress, host, pid, and where the main thread
     is: in a collective, i.e. a torch.distributed frame or the backward pass, where DDP
     all-reduces the gradients, or not) to <run_dir>/hangs/<start>/rank<r>.json;
  2. its Python stacks (faulthandler, every thread) to stderr and rank<r>.stack;
  3. it waits up to `grace_s` for the other ranks' reports (the run directory is on a file
     system all nodes share, as resuming needs anyway) and logs which ranks hung: those not
     in a collective while the others wait in one, else those behind the others in the step
     (NCCL's collectives are asynchronous: a rank waiting for a peer blocks later, at its next
     synchronisation with the GPU, not in the collective);
  4. under SLURM the lowest reporting rank runs `scontrol requeue $SLURM_JOB_ID`, at most
     `max_requeues` times per run (counted in hangs/);
  5. os._exit(EXIT_CODE).
A main thread that holds the GIL (stuck in C code) stops this thread too: faulthandler's own
timer, armed at timeout + grace + 60 s, then dumps that process and exits it (code 1, no
requeue: srun ends the job step, the collective timeout ends the other ranks). faulthandler
also dumps on fatal signals (SIGSEGV; SIGABRT, which NCCL's timeout sends) and on SIGUSR2,
for a look at a live run (`scancel --signal=USR2 JOBID`). Work done inside one step (a long
ZeroShotValidation, the first step's compilation) must fit in `timeout_s`.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import traceback
from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
import torch

log = logging.getLogger("segany.watchdog")

EXIT_CODE = 124  # as timeout(1): the run was stopped for taking too long
_LIBRARIES = tuple({sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")})
_TORCH = os.path.dirname(torch.__file__)
_COLLECTIVES = (  # code that waits for the other ranks
    os.path.dirname(torch.distributed.__file__),  # collectives, FSDP's all-gathers
    os.path.join(_TORCH, "nn", "parallel", "distributed.py"),  # DDP's buffer broadcasts
)
_AUTOGRAD = os.path.dirname(torch.autograd.__file__)  # DDP all-reduces the gradients in backward


def where(frame) -> dict:
    """Where a thread is: `waiting` (in a collective, or the backward pass), `call` (the
    innermost such function, if so) and `at` (the innermost frame outside the standard library
    and the installed packages)."""
    stack = traceback.extract_stack(frame)
    dist = next((f for f in reversed(stack) if f.filename.startswith(_COLLECTIVES)), None)
    grad = next((f for f in reversed(stack) if f.filename.startswith(_AUTOGRAD)), None)
    own = next((f for f in reversed(stack) if not f.filename.startswith(_LIBRARIES)), stack[-1])
    call = None
    if dist is not None:
        call = f"in a collective: {dist.name} ({os.path.relpath(dist.filename, os.path.dirname(_TORCH))}:{dist.lineno})"
    elif grad is not None:
        call = "in backward (where DDP all-reduces the gradients)"
    return {"waiting": call is not None, "call": call, "at": f"{own.filename}:{own.lineno} in {own.name}"}


def summary(reports: list, world_size: int, timeout_s: float) -> str:
    """Which ranks hung, from every rank's report (some may be missing)."""
    stuck = [r["rank"] for r in reports if not r["waiting"]]
    waiting = [r["rank"] for r in reports if r["waiting"]]
    missing = sorted(set(range(world_size)) - {r["rank"] for r in reports})
    least = min((r["progress"] for r in reports), default=None)
    behind = [r["rank"] for r in reports if r["progress"] == least]
    if stuck and waiting:
        head = f"rank(s) {stuck} hung (not in a collective) while rank(s) {waiting} wait for them"
    elif len(behind) < len(reports):  # NCCL: the others ran on to a later point before blocking
        head = f"rank(s) {behind} are behind the others (the ranks that hung, most likely)"
    elif stuck:
        head = f"rank(s) {stuck} made no progress (none waits in a collective)"
    else:
        head = "every reporting rank waits in a collective"
    if missing:
        head += f"; no report from rank(s) {missing}: dead, stuck holding the GIL, or not on this file system"
    lines = [f"hang: no training progress for {timeout_s:g} s; {head}"]
    for r in sorted(reports, key=lambda r: r["rank"]):
        doing = f", {r['call']}" if r["call"] else ""
        lines.append(
            f"  rank {r['rank']} ({r['host']} pid {r['pid']}): step {r['step']}, {r['phase']} for "
            f"{r['seconds']:.0f} s{doing}, at {r['at']}"
        )
    return "\n".join(lines)


class HangWatchdog(pl.Callback):
    FALLBACK_S = 60  # faulthandler's timer: this long after the watchdog's own report would be due

    def __init__(self, timeout_s: float = 1500, grace_s: float = 30, requeue: bool = True, max_requeues: int = 3):
        self.timeout_s, self.grace_s = float(timeout_s), float(grace_s)
        self.requeue, self.max_requeues = bool(requeue), int(max_requeues)
        self._batch = -1  # the training batch index last started
        self._mark = None  # (deadline, phase, (step, batch, order), time.time() when it began)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- progress ----------------------------------------------------------------------
    def _arm(self, trainer, phase: str, order: int = 4, batch: int = -1, fallback: bool = False) -> None:
        """A new deadline; (global step, batch, order in the step: 1 training step, 2 backward,
        3 optimiser step, 4 after the batch) orders the ranks' progress, the same on every rank."""
        if self._thread is None:
            return
        self._batch = batch if batch >= 0 else self._batch
        progress = (trainer.global_step, self._batch, order)
        self._mark = (time.monotonic() + self.timeout_s, phase, progress, time.time())
        if fallback:  # faulthandler's timer starts a thread per call: once per batch is enough
            faulthandler.dump_traceback_later(self.timeout_s + self.grace_s + self.FALLBACK_S, exit=True, file=2)

    def on_train_start(self, trainer, pl_module):
        start = trainer.strategy.broadcast(time.strftime("%Y%m%d-%H%M%S"))  # one directory per start
        self.dir = Path(trainer.default_root_dir) / "hangs" / start
        self.rank, self.world_size = trainer.global_rank, trainer.world_size
        faulthandler.enable(file=2, all_threads=True)  # the process's stderr, whatever sys.stderr is now
        faulthandler.register(signal.SIGUSR2, file=2, all_threads=True, chain=False)
        self._main = threading.main_thread().ident
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="segany-hang-watchdog", daemon=True)
        self._thread.start()
        self._batch = -1
        self._arm(trainer, "starting to train", order=0, fallback=True)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._arm(trainer, "in the training step", order=1, batch=batch_idx, fallback=True)

    def on_before_backward(self, trainer, pl_module, loss):
        self._arm(trainer, "in backward", order=2)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._arm(trainer, "in the optimiser step", order=3)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._arm(trainer, "between steps (data, logging, checkpoint, validation)")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._arm(trainer, f"in validation batch {batch_idx}", fallback=True)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self._arm(trainer, "saving a checkpoint")

    def on_exception(self, trainer, pl_module, exception):
        self.teardown(trainer, pl_module, "fit")  # Lightning calls no teardown hook then; a caller may go on

    def teardown(self, trainer, pl_module, stage):
        if self._thread is not None:
            self._stop.set()
            self._thread = None
            faulthandler.cancel_dump_traceback_later()

    # -- the watching thread -----------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 10)):
            if self._mark is not None and time.monotonic() > self._mark[0]:
                self._fire(*self._mark[1:])

    def _fire(self, phase: str, progress: tuple, since: float) -> None:
        frame = sys._current_frames().get(self._main)
        report = {"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(), "step": progress[0]}
        report.update(phase=phase, progress=list(progress), seconds=time.time() - since)
        report.update(where(frame) if frame is not None else {"waiting": False, "call": None, "at": "?"})
        self.dir.mkdir(parents=True, exist_ok=True)
        me = self.dir / f"rank{self.rank}"
        sys.stderr.flush()
        os.write(2, f"\nhang watchdog: rank {self.rank}: Python stacks follow\n".encode())
        faulthandler.dump_traceback(file=2, all_threads=True)
        with open(me.with_suffix(".stack"), "w") as f:
            faulthandler.dump_traceback(file=f, all_threads=True)
        tmp = me.with_suffix(".tmp")  # the report last: a rank with a report has dumped its stacks
        tmp.write_text(json.dumps(report))
        os.replace(tmp, me.with_suffix(".json"))
        reports = self._gather()
        log.error("%s\nstacks and reports: %s", summary(reports, self.world_size, self.timeout_s), self.dir)
        if min(r["rank"] for r in reports) == self.rank:
            self._requeue()
        os._exit(EXIT_CODE)

    def _gather(self) -> list:
        """The reports of every rank, waiting up to grace_s for the missing ones."""
        end = time.monotonic() + self.grace_s
        while True:
            found = []
            for p in self.dir.glob("rank*.json"):
                try:
                    found.append(json.loads(p.read_text()))
                except (OSError, ValueError):
                    pass
            if len(found) >= self.world_size or time.monotonic() > end:
                return found
            time.sleep(0.2)

    def _requeue(self) -> None:
        job = os.environ.get("SLURM_JOB_ID")
        if not self.requeue or not job:
            return
        done = len(list(self.dir.parent.glob("*/requeued")))
        if done >= self.max_requeues:
            log.error("not requeued: %d requeues after hangs already (max_requeues)", done)
            return
        (self.dir / "requeued").write_text(job)
        log.error("requeueing SLURM job %s (scontrol requeue): it resumes from its last checkpoint", job)
        p = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        if p.returncode != 0:
            log.error("scontrol requeue %s failed: %s", job, (p.stderr or p.stdout).strip())
