"""Atomic checkpoints: a kill (SIGKILL, node failure, time limit) during a write leaves the
previous checkpoint intact and loadable.

- Single file (DDP, one device): `AtomicCheckpointIO` torch.saves through
  `segany.utils.io.atomic_write` (a temporary file beside the target, fsync, `os.replace`).
- Sharded (FSDP2, torch distributed checkpoint, a directory): `AtomicModelParallelStrategy`
  writes every rank's shard into ``<name>.tmp``, then rank 0 swaps directories
  (`segany.utils.io.replace_dir`): ``<name>`` -> ``<name>.old``, ``<name>.tmp`` -> ``<name>``,
  delete ``<name>.old``.
  Between the two renames only ``<name>.old`` exists; `resolve_checkpoint` falls back to it.

Both are selected by the configs (configs/trainer/default.yaml `plugins`,
configs/strategy/fsdp.yaml), so ModelCheckpoint's periodic and `last` checkpoints and
train.py's final one all go through them, and so does resuming: both read checkpoints as
data (`weights_only=True`; the sharded one through segany.modeling.checkpoint.trust's safe
DCP reader), a file carrying other Python objects is refused with an error naming it. What
train.py writes needs nothing more: SamModule saves no hyper-parameters, the run config
is stored as plain containers, callbacks' and the datamodule's states are plain too.

Every checkpoint carries a manifest, the size and hash of each of its files
(segany.modeling.checkpoint.manifest), written after the files: `resume_candidates` and
`newest_verified` give train.py's resume=auto the newest checkpoint that matches its own.
A write that runs out of space (ENOSPC) raises `DiskFullError` naming the directory, the
bytes the checkpoint needs and the bytes free; the previous checkpoint is intact (the new one
was never renamed over it, its temporary file or directory is removed).

Both refuse to write a state dict holding a NaN or inf (`refuse_nonfinite`, naming the key;
the sharded one after all ranks agree): the checkpoint already there stays.

Here, not in segany.modeling.checkpoint, because both classes are Lightning plugins: the
modeling layer (and `import segany`) stays free of pytorch_lightning (tests/test_layers.py).
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from lightning_fabric.plugins import TorchCheckpointIO
from pytorch_lightning.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.api import CheckpointException

from segany.modeling.checkpoint.manifest import manifest_path, problems, save_with_manifest, write_manifest
from segany.modeling.checkpoint.read import LIGHTNING_META
from segany.modeling.checkpoint.trust import (
    CheckpointError,
    load_distributed,
    refused_global,
    torch_load,
    unsafe_error,
)
from segany.training.nonfinite import NonFiniteError, first_nonfinite
from segany.utils.io import OLD_SUFFIX, remove, replace_dir

__all__ = [
    "AtomicCheckpointIO",
    "AtomicModelParallelStrategy",
    "DiskFullError",
    "newest_verified",
    "replace_dir",
    "resolve_checkpoint",
    "resume_candidates",
]
log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file in the target directory, fsync, rename over the target."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint: storage_options are not supported")
        refuse_nonfinite(first_nonfinite(checkpoint.get("state_dict") or {}), path)
        if "://" in str(path):  # object stores: Lightning's own (transactional) write
            return super().save_checkpoint(checkpoint, path)
        try:
            save_with_manifest(checkpoint, path)
        except Exception as e:
            if disk_full(e):
                raise disk_full_error(path, tensor_bytes(checkpoint)) from e
            raise

    def remove_checkpoint(self, path) -> None:
        """The checkpoint and its manifest (ModelCheckpoint's retention deletes through this)."""
        super().remove_checkpoint(path)
        if "://" not in str(path):
            remove(manifest_path(path))

    def load_checkpoint(self, path, map_location=None, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """torch.load with weights_only=True unless the caller explicitly passes False."""
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only=weights_only is not False)
        return torch_load(path, trust=weights_only is False, map_location=map_location or "cpu")


class AtomicModelParallelStrategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy (FSDP2) with atomic distributed checkpoints."""

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Optional[Any] = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        bad = first_nonfinite(checkpoint.get("state_dict") or {})  # this rank's shards; every rank refuses together
        if self.reduce(torch.tensor(float(bad is not None), device=self.root_device), reduce_op="sum"):
            refuse_nonfinite(bad or "a tensor of another rank's shard", path)
        tmp = path.with_name(path.name + ".tmp")
        if self.global_rank == 0:
            remove(tmp)
        self.barrier("segany_ckpt_tmp_clean")
        needed = tensor_bytes(checkpoint)  # before Lightning pops the state out of `checkpoint`
        error = _attempt(super().save_checkpoint, checkpoint, tmp, storage_options)
        self._agree(error, path, tmp, needed)  # every rank's shard is in place, or every rank raises
        error = _attempt(write_manifest, tmp) if self.global_rank == 0 else None  # one entry per file
        self._agree(error, path, tmp, needed)
        if self.global_rank == 0:
            replace_dir(tmp, path)
        self.barrier("segany_ckpt_swapped")

    def _agree(self, error: Optional[BaseException], path: Path, tmp: Path, needed: int) -> None:
        """All ranks learn whether any rank's part of the write failed (one all-reduce, so no
        rank waits forever for one that gave up); then all raise, after rank 0 removed `tmp`."""
        code = 0 if error is None else 2 if disk_full(error) else 1
        worst = int(self.reduce(torch.tensor(code, device=self.root_device), reduce_op="max"))
        if not worst:
            return
        if worst == 2:  # the whole checkpoint's size: every rank's shard
            total = torch.tensor(float(needed), dtype=torch.float64, device=self.root_device)
            needed = int(self.reduce(total, reduce_op="sum"))
        if self.global_rank == 0:
            remove(tmp)
        if worst == 2:
            raise disk_full_error(path, needed) from error
        if error is not None:
            raise error
        raise RuntimeError(f"writing checkpoint {path}: another rank's part of the write failed; {path} is unchanged")

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Resume: Lightning's sharded branch (model, then each optimiser, then `meta.pt`),
        read through segany.modeling.checkpoint.trust.load_distributed instead of `dcp.load`'s default
        reader and planner (which unpickle `.metadata` and non-tensor entries unrestricted).
        A single file goes to Lightning with weights_only=True."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        trust = weights_only is False
        path = Path(self.broadcast(str(checkpoint_path)))
        if not path.is_dir():
            try:
                return super().load_checkpoint(path, weights_only=not trust)
            except pickle.UnpicklingError as e:
                raise unsafe_error(path, refused_global(e)) from e
        module = self.model
        model_state = {"state_dict": get_model_state_dict(module)}
        load_distributed(model_state, path, trust)
        module.load_state_dict(model_state["state_dict"], strict=self.lightning_module.strict_loading)
        for i, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{i}"
            optim_state = {key: get_optimizer_state_dict(module, optimizer)}
            load_distributed(optim_state, path, trust)
            set_optimizer_state_dict(
                module, optimizer, optim_state_dict=optim_state[key], options=StateDictOptions(cpu_offload=True)
            )
        return torch_load(path / LIGHTNING_META, trust)


def refuse_nonfinite(bad: Optional[str], path) -> None:
    """Checkpoints never hold non-finite weights: `bad` (segany.training.nonfinite.first_nonfinite
    of the state dict) names the first such key; the write does not start."""
    if bad is not None:
        raise NonFiniteError(
            f"refusing to write checkpoint {path}: state_dict key {bad}; what is already at that path is kept"
        )


def _attempt(fn, *args) -> Optional[BaseException]:
    """fn(*args)'s exception, or None (DCP's CheckpointException is a BaseException)."""
    try:
        fn(*args)
    except (Exception, CheckpointException) as e:
        return e
    return None


# ----------------------------------------------------------------- disk full


class DiskFullError(OSError):
    """A checkpoint write ran out of space (errno ENOSPC); the previous checkpoint is intact."""


def disk_full(error: BaseException) -> bool:
    """Whether `error` is an ENOSPC or came from one: torch.save turns the OSError into a
    RuntimeError (its __context__), DCP gathers each rank's into a CheckpointException."""
    seen, stack = set(), [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e):
            return True
        stack += [e.__cause__, e.__context__]
        stack += [f[0] for f in getattr(e, "failures", {}).values()] if isinstance(e, CheckpointException) else []
    return False


def tensor_bytes(obj) -> int:
    """The bytes of the tensors in a (nested) checkpoint: what writing it needs at least. A
    DTensor counts this rank's shard."""
    if isinstance(obj, torch.Tensor):
        t = obj.to_local() if hasattr(obj, "to_local") else obj
        return t.numel() * t.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def disk_full_error(path, needed: int) -> DiskFullError:
    """The error for a checkpoint write to `path` that hit ENOSPC: the directory, the bytes the
    checkpoint needs (beside the previous one: the write replaces it only when complete) and
    the bytes free now that the partial write is removed."""
    directory = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(directory).free
    return DiskFullError(
        errno.ENOSPC,
        f"no space left in {directory} for checkpoint {os.path.basename(path)}: it needs at least "
        f"{needed} bytes ({needed / 2**30:.2f} GiB) beside the previous one, {free} bytes "
        f"({free / 2**30:.2f} GiB) are free. The previous checkpoint is intact: free space there "
        f"(or keep fewer: callbacks.checkpoint.save_top_k) and rerun the same command to resume from it",
    )


# ----------------------------------------------------------------- resume


def resume_candidates(run_dir) -> list[str]:
    """Every checkpoint of a run, newest first (modification time): checkpoints/last.ckpt and
    last.ckpt.old (a directory swap interrupted, resolve_checkpoint), the periodic ones
    ModelCheckpoint keeps (checkpoints/*.ckpt, checkpoints/kept/*.ckpt) and the
    hpc_ckpt_*.ckpt Lightning writes into the run directory on a SLURM requeue signal."""
    ckpts = os.path.join(run_dir, "checkpoints")
    patterns = ("*.ckpt", f"*.ckpt{OLD_SUFFIX}", os.path.join("*", "*.ckpt"))
    found = {p for pattern in patterns for p in glob.glob(os.path.join(ckpts, pattern))}
    found |= set(glob.glob(os.path.join(run_dir, "hpc_ckpt_*.ckpt")))
    return sorted(found, key=lambda p: os.path.getmtime(p) if os.path.exists(p) else 0.0, reverse=True)


def newest_verified(candidates: list[str]) -> str:
    """The first of `candidates` (newest first) that matches its manifest, each one skipped
    logged with what differs (file, expected vs found size or hash). A checkpoint with no
    manifest (written by an older segany or by hand) is taken unverified, and logged so.
    Raises CheckpointError when every candidate is damaged."""
    skipped = []
    for path in candidates:
        found = problems(path)
        if found is None:
            log.info("%s has no manifest (an older segany's or a hand-made checkpoint): taken unverified", path)
            return path
        if not found:
            if skipped:
                log.warning("resume: %s verifies; %d newer checkpoint(s) skipped", path, len(skipped))
            return path
        log.warning("resume: skipping %s, it does not match its manifest: %s", path, "; ".join(found))
        skipped.append(f"{path}: {'; '.join(found)}")
    raise CheckpointError(
        "resume: no checkpoint matches its manifest:\n  " + "\n  ".join(skipped) + "\nresume=null starts afresh"
    )


def resolve_checkpoint(path) -> Optional[str]:
    """`path` if it exists, else its `.old` sibling left by an interrupted directory swap,
    else None."""
    p = Path(path)
    if p.exists():
        return str(p)
    old = p.with_name(p.name + OLD_SUFFIX)
    return str(old) if old.exists() else None
