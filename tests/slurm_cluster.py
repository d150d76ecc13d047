"""A throw-away single-node SLURM cluster on this machine, for tests/test_slurm.py.

Everything lives in one directory: a munge key and munged (its own socket), slurm.conf
(this host as controller and only compute node, free ports, no cgroups, no accounting),
slurmctld and slurmd in the foreground (-D) as children of the test. Clients (sbatch,
scontrol, srun, Lightning's `scontrol requeue`) find it through SLURM_CONF, which `env`
holds. Needs Debian's slurm-wlm and munge (22.05+) and root (slurmd runs jobs as their
user). `LocalSlurm.start()` raises `SlurmUnavailable` with the reason when any of that is
missing or the node does not come up; `stop()` ends every daemon it started.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel", "srun")


class SlurmUnavailable(RuntimeError):
    """SLURM cannot run here; the message says why."""


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalSlurm:
    def __init__(
        self,
        root: Path,
        cpus: int | None = None,
        real_memory_mb: int | None = None,
        kill_wait_s: int = 5,
        cred_expire_s: int = 10,
    ):
        self.root = Path(root)
        # never more than the machine has: slurmd drains a node that is smaller than configured
        self.cpus = cpus or min(2, os.cpu_count() or 1)
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        self.real_memory_mb = real_memory_mb or max(1, min(2000, mem // 2))
        self.kill_wait_s = kill_wait_s
        # a requeued job may start again cred_expire + 1 s after the requeue (default 120 s)
        self.cred_expire_s = cred_expire_s
        self.host = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen] = {}
        self._cleanup: list[Path] = []
        self.env = dict(os.environ)

    # ---------------------------------------------------------------- setup
    def _check_prerequisites(self) -> None:
        missing = [b for b in BINARIES if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]
        if missing:
            raise SlurmUnavailable(f"missing {', '.join(missing)} (apt-get install slurm-wlm munge; .ci/run does)")
        if os.geteuid() != 0:
            raise SlurmUnavailable("slurmd must run as root to start jobs (this test is not root)")
        try:
            socket.gethostbyname(self.host)
        except OSError as e:
            raise SlurmUnavailable(f"host name {self.host!r} does not resolve ({e})") from e

    def _which(self, name: str) -> str:
        return shutil.which(name) or f"/usr/sbin/{name}"

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / f"{name}.stdout", "wb")
        self.procs[name] = subprocess.Popen(
            cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        log.close()

    def _start_munge(self) -> None:
        d = self.root / "munge"
        if len(str(d / "munge.socket")) > 100:  # a unix socket's path has at most 107 bytes
            d = Path(tempfile.mkdtemp(prefix="segany-munge-"))
            self._cleanup.append(d)
        else:
            d.mkdir(mode=0o700)
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.munge_socket = d / "munge.socket"
        self._spawn(
            "munged",
            [
                self._which("munged"),
                "--foreground",
                "--force",
                f"--key-file={key}",
                f"--socket={self.munge_socket}",
                f"--pid-file={d / 'munged.pid'}",
                f"--log-file={d / 'munged.log'}",
                f"--seed-file={d / 'munged.seed'}",
            ],
        )
        self._wait(lambda: self.munge_socket.exists(), 10, "munged", d / "munged.log")

    def _write_conf(self) -> Path:
        r = self.root
        (r / "state").mkdir()
        (r / "spool").mkdir()
        ctld_port, d_port = _free_ports(2)
        conf = f"""\
ClusterName=segany-test
SlurmctldHost={self.host}
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire_s}
CredType=cred/munge
StateSaveLocation={r / "state"}
SlurmdSpoolDir={r / "spool"}
SlurmctldPidFile={r / "slurmctld.pid"}
SlurmdPidFile={r / "slurmd.pid"}
SlurmctldLogFile={r / "slurmctld.log"}
SlurmdLogFile={r / "slurmd.log"}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
KillWait={self.kill_wait_s}
MinJobAge=300
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
PlugStackConfig={r / "plugstack.conf"}
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.real_memory_mb} State=UNKNOWN
PartitionName=test Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
"""
        (r / "plugstack.conf").write_text("")
        path = r / "slurm.conf"
        path.write_text(conf)
        return path

    def _wait(self, ok, timeout: float, what: str, log: Path | None = None) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise SlurmUnavailable(f"{name} exited with {p.returncode}: {self._tail(name)}")
            if ok():
                return
            time.sleep(0.3)
        raise SlurmUnavailable(f"{what} not ready after {timeout:.0f} s: {self._tail(what, log)}")

    def _tail(self, name: str, log: Path | None = None, n: int = 1500) -> str:
        text = ""
        for f in (log, self.root / f"{name}.log", self.root / f"{name}.stdout"):
            if f is not None and f.exists():
                text += f.read_text(errors="replace")[-n:]
        return text.strip() or "(no output)"

    def node_state(self) -> str:
        try:
            p = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True, timeout=10
            )
        except subprocess.TimeoutExpired:
            return ""
        return p.stdout.strip()

    def start(self, timeout: float = 30) -> "LocalSlurm":
        self._check_prerequisites()
        try:
            self._start_munge()
            self.env["SLURM_CONF"] = str(self._write_conf())
            self._spawn("slurmctld", [self._which("slurmctld"), "-D", "-i"])
            self._spawn("slurmd", [self._which("slurmd"), "-D", "-N", self.host])
            self._wait(
                lambda: self.node_state() == "idle", timeout, "slurmctld/slurmd (node idle)", self.root / "slurmd.log"
            )
        except BaseException:
            self.stop()
            raise
        return self

    # ---------------------------------------------------------------- use
    def run(self, *cmd: str, timeout: float = 30, check: bool = True, **kw) -> subprocess.CompletedProcess:
        p = subprocess.run(
            list(cmd), env=kw.pop("env", self.env), capture_output=True, text=True, timeout=timeout, **kw
        )
        if check and p.returncode:
            raise RuntimeError(f"{' '.join(cmd)} -> {p.returncode}: {p.stdout}{p.stderr}")
        return p

    def job(self, job_id: str) -> dict:
        """`scontrol show job -o`: the job's fields (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        fields = {}
        for tok in out.split():
            k, _, v = tok.partition("=")
            fields[k] = v
        return fields

    # ---------------------------------------------------------------- teardown
    def stop(self) -> None:
        """Cancel what is still queued or running (its processes belong to slurmstepd, not to
        the daemons' process groups), then end slurmd, slurmctld and munged."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None and "SLURM_CONF" in self.env:
            try:
                jobs = self.run("squeue", "-h", "-o", "%i", check=False, timeout=10).stdout.split()
                if jobs:
                    self.run("scancel", *jobs, check=False, timeout=10)
                    t0 = time.time()
                    while time.time() - t0 < 20 and self.run("squeue", "-h", check=False, timeout=10).stdout.strip():
                        time.sleep(0.5)
            except (OSError, subprocess.SubprocessError):
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        self.procs.clear()
        for d in self._cleanup:
            shutil.rmtree(d, ignore_errors=True)
        self._cleanup.clear()
