"""OmegaConf resolvers shared by train.py and evaluate.py: run names and directories, and
the trainer's devices / nodes from the launcher that started the job."""

from __future__ import annotations

import os
import re
from typing import Optional

from omegaconf import OmegaConf


def slurm_suffix() -> str:
    """ "_<SLURM_JOB_ID>" inside a SLURM job (constant across requeues), "" otherwise."""
    return f"_{os.environ['SLURM_JOB_ID']}" if os.environ.get("SLURM_JOB_ID") else ""


MAX_DIRNAME = 120  # longer override lists are shortened to a prefix + a hash (names are <= 255 bytes)


def _multirun_job():
    """The running job's hydra config in a multirun (``-m``) job, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:  # pragma: no cover
        return None
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return hc if hc.get("mode") == RunMode.MULTIRUN else None


def sweep_job() -> str:
    """Directory of this job inside its sweep: the job's command-line overrides
    (``hydra.job.override_dirname``, minus ``hydra.job.config.override_dirname.exclude_keys``)
    with "/" replaced, "base" when there are none, plus the SLURM suffix. Derived from the
    overrides only (no timestamp, no job number), so a requeued or re-launched job finds its own
    directory again. "" outside a multirun job."""
    hc = _multirun_job()
    if hc is None:
        return ""
    name = str(hc.job.get("override_dirname") or "").replace(os.sep, "_") or "base"
    if len(name) > MAX_DIRNAME:
        import hashlib

        name = name[: MAX_DIRNAME - 11] + "-" + hashlib.sha1(name.encode()).hexdigest()[:10]
    return name + slurm_suffix()


def run_name(name: str) -> str:
    """``paths.run_name``: "<name>[_<SLURM job id>]" for a single run; "<name>_sweep/<sweep_job>"
    for each job of a multirun, so that every job of a sweep has its own run directory."""
    job = sweep_job()
    return f"{name}_sweep/{job}" if job else f"{name}{slurm_suffix()}"


def output_dir(default: str) -> str:
    """``paths.run_dir``: the output directory Hydra has given the running job, once it has one
    (train.py: hydra.run.dir / hydra.sweep.dir + subdir, both = root / run_name; also a Lightning
    DDP rank that Lightning re-launches with hydra.run.dir=<rank 0's directory>, which must agree
    with rank 0 even inside a multirun), else `default` (Hydra not running: compose() in tests)."""
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:  # pragma: no cover
        return default
    if HydraConfig.initialized():
        out = OmegaConf.select(HydraConfig.get(), "runtime.output_dir", default=None, throw_on_missing=False)
        if out:
            return str(out)
    return default


def launcher_layout() -> Optional[tuple[str, int, int]]:
    """(launcher, processes per node, nodes) of the launcher that started this process, else None.
    Detected as Lightning detects it, so that the counts pass its checks: torchrun first
    (TORCHELASTIC_RUN_ID; LOCAL_WORLD_SIZE per node, WORLD_SIZE / LOCAL_WORLD_SIZE nodes; Lightning
    checks devices x num_nodes == WORLD_SIZE), then SLURM (SLURM_NTASKS set and the job not named
    bash / interactive; SLURM_NTASKS_PER_NODE, else SLURM_NTASKS / nodes, per node; SLURM_NNODES or
    SLURM_JOB_NUM_NODES nodes; Lightning checks devices == SLURM_NTASKS_PER_NODE and num_nodes ==
    SLURM_NNODES). One process per device: the counts are Lightning's `devices` and `num_nodes`."""
    env = os.environ
    if env.get("TORCHELASTIC_RUN_ID") is not None and "LOCAL_WORLD_SIZE" in env:
        local, world = int(env["LOCAL_WORLD_SIZE"]), int(env.get("WORLD_SIZE", env["LOCAL_WORLD_SIZE"]))
        if local < 1 or world % local:
            raise ValueError(f"torchrun: WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local}")
        return "torchrun", local, world // local
    if "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        nodes = int(env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES") or 1)
        per_node = env.get("SLURM_NTASKS_PER_NODE")
        if per_node:  # "8", or "8(x4)" for 4 nodes of 8 tasks
            m = re.match(r"\d+", per_node)
            if m is None:
                raise ValueError(f"SLURM_NTASKS_PER_NODE={per_node!r}: expected a number of tasks")
            return "slurm", int(m.group()), nodes
        ntasks = int(env["SLURM_NTASKS"])
        if ntasks % nodes:
            raise ValueError(f"SLURM: {ntasks} tasks do not split evenly over {nodes} nodes; set --ntasks-per-node")
        return "slurm", ntasks // nodes, nodes
    return None


def launcher_devices(default="auto"):
    """``trainer.devices``: processes per node of the launcher (launcher_layout), else `default`."""
    layout = launcher_layout()
    return default if layout is None else layout[1]


def launcher_num_nodes(default=1):
    """``trainer.num_nodes``: nodes of the launcher (launcher_layout), else `default`."""
    layout = launcher_layout()
    return default if layout is None else layout[2]


def register_resolvers() -> None:
    """${slurm_suffix:}, ${sweep_job:}, ${run_name:<name>}, ${output_dir:<default>},
    ${launcher_devices:<default>}, ${launcher_num_nodes:<default>} (see above)."""
    for key, fn in (
        ("slurm_suffix", slurm_suffix),
        ("sweep_job", sweep_job),
        ("run_name", run_name),
        ("output_dir", output_dir),
        ("launcher_devices", launcher_devices),
        ("launcher_num_nodes", launcher_num_nodes),
    ):
        if not OmegaConf.has_resolver(key):
            OmegaConf.register_new_resolver(key, fn)
