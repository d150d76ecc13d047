"""OmegaConf resolvers shared by train.py and evaluate.py: run names and directories, and
the trainer's devices / nodes from the launcher that started the job."""

from __future__ import annotations

import os

from omegaconf import OmegaConf

from segany.utils.dist import launcher


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


def launcher_devices(default="auto"):
    """``trainer.devices``: processes per node of the launcher (segany.utils.dist.launcher), else `default`."""
    launch = launcher()
    return default if launch is None or launch.per_node is None else launch.per_node


def launcher_num_nodes(default=1):
    """``trainer.num_nodes``: nodes of the launcher (segany.utils.dist.launcher), else `default`."""
    launch = launcher()
    return default if launch is None or launch.nodes is None else launch.nodes


def launcher_world_size(default=1):
    """``trainer.strategy.data_parallel_size`` under FSDP: the launcher's world size, else `default`."""
    launch = launcher()
    return default if launch is None else launch.world_size


def register_resolvers() -> None:
    """${slurm_suffix:}, ${sweep_job:}, ${run_name:<name>}, ${output_dir:<default>},
    ${launcher_devices:<default>}, ${launcher_num_nodes:<default>}, ${launcher_world_size:<default>} (see above);
    ${trainer_precision:<fp32|bf16|auto>,<accelerator>}, ${param_dtype:<trainer precision>}
    (segany/utils/precision.py)."""
    from segany.utils.precision import param_dtype, trainer_precision

    for key, fn in (
        ("slurm_suffix", slurm_suffix),
        ("sweep_job", sweep_job),
        ("run_name", run_name),
        ("output_dir", output_dir),
        ("launcher_devices", launcher_devices),
        ("launcher_num_nodes", launcher_num_nodes),
        ("launcher_world_size", launcher_world_size),
        ("trainer_precision", trainer_precision),
        ("param_dtype", param_dtype),
    ):
        if not OmegaConf.has_resolver(key):
            OmegaConf.register_new_resolver(key, fn)
