"""What each training data-loader worker is reading, kept outside the worker, so that when
one dies (the OOM killer, a crash in a decoder, SIGKILL) the error names the shard and key.

Why hand-written: when the main process learns of the death (DataLoader's "DataLoader
worker (pid N) is killed by signal: ..." / "exited unexpectedly" error) the worker is gone,
and torch says nothing about what it was doing. So each worker writes one fixed-size line
into its own small file at each step of its loop (reading the next record, decoding one,
handing one over): one `os.pwrite`, no lock, a few microseconds next to a sample's
milliseconds. The files lie in a temporary directory made by the loader in the main process
(removed with it); each line starts with the worker's pid, which the error names too.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import weakref
from typing import Optional

RECORD = 1024  # bytes per worker line
_PIDS = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\)")


def _remove(path: str, owner: int) -> None:
    if os.getpid() == owner:  # not from a forked worker's copy
        shutil.rmtree(path, ignore_errors=True)


class WorkerNotes:
    """A directory of one line per worker: `note()` in the worker, `read()` in the main process."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="segany-workers-")
        self._fd: Optional[int] = None  # this process's file, opened at its first note
        self._fd_pid = None
        weakref.finalize(self, _remove, self.dir, os.getpid())

    def __getstate__(self):  # to spawned workers: the directory, not this process's file
        return {"dir": self.dir, "_fd": None, "_fd_pid": None}

    def note(self, worker: int, text: str) -> None:
        if self._fd is None or self._fd_pid != os.getpid():
            path = os.path.join(self.dir, f"worker{worker}")
            self._fd, self._fd_pid = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644), os.getpid()
        line = f"{os.getpid()} {text}".encode("utf-8", "replace")[:RECORD]
        os.pwrite(self._fd, line.ljust(RECORD, b"\0"), 0)

    def read(self) -> dict:
        """{pid: (worker id, its latest line)} of every worker that wrote one."""
        out = {}
        for name in os.listdir(self.dir) if os.path.isdir(self.dir) else []:
            if not name.startswith("worker"):
                continue
            with open(os.path.join(self.dir, name), "rb") as f:
                pid, _, text = f.read(RECORD).rstrip(b"\0").decode("utf-8", "replace").partition(" ")
            if pid.isdigit():
                out[int(pid)] = (int(name[len("worker") :]), text)
        return out


def worker_death(exc: BaseException, notes: Optional[WorkerNotes], rank: int = 0) -> Optional[str]:
    """The message for DataLoader's error about dead workers (`exc`): which worker of which
    rank, and the shard and key each was at; None when `exc` is not such an error."""
    m = _PIDS.search(str(exc))
    if m is None or notes is None:
        return None
    seen = notes.read()
    lines = []
    for pid in (int(p) for p in m.group(1).replace(",", " ").split()):
        worker, text = seen.get(pid, ("?", "no note (it died before reading anything)"))
        lines.append(f"data-loader worker {worker} of rank {rank} (pid {pid}) died {text}")
    return (
        "; ".join(lines) + f" [{str(exc).strip()}]. The data position of the last checkpoint is "
        "untouched: run the same command again to resume there (resume=auto), nothing skipped or "
        "repeated. A worker killed by the OOM killer (see `dmesg`) needs fewer data.num_workers or "
        "a smaller data.batch_size; one that dies at the same key again points at that sample."
    )
