"""Atomic checkpoints: a kill (SIGKILL, node failure, time limit) during a write leaves the
previous checkpoint intact and loadable.

- Single file (DDP, one device): `AtomicCheckpointIO` writes ``<name>.tmp<pid>`` beside
  the target, fsyncs it and `os.replace`s it over the target (atomic on POSIX file systems).
- Sharded (FSDP2, torch distributed checkpoint, a directory): `AtomicModelParallelStrategy`
  writes every rank's shard into ``<name>.tmp``, then rank 0 swaps directories:
  ``<name>`` -> ``<name>.old``, ``<name>.tmp`` -> ``<name>``, delete ``<name>.old``.
  Between the two renames only ``<name>.old`` exists; `resolve_checkpoint` falls back to it.

Both are selected by the configs (configs/trainer/default.yaml `plugins`,
configs/strategy/fsdp.yaml), so ModelCheckpoint's periodic and `last` checkpoints and
train.py's final one all go through them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from lightning_fabric.plugins import TorchCheckpointIO
from pytorch_lightning.strategies import ModelParallelStrategy


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file in the target directory, fsync, rename over the target."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint: storage_options are not supported")
        path = Path(path)
        if "://" in str(path):  # object stores: Lightning's own (transactional) write
            return super().save_checkpoint(checkpoint, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        _fsync_dir(path.parent)


def _remove(path: Path) -> None:
    """Delete a file or a directory tree, if it exists."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def replace_dir(tmp: Path, path: Path) -> None:
    """Make directory `tmp` the new `path`; the old `path` survives as `path.old` until the
    new one is in place."""
    old = path.with_name(path.name + ".old")
    _remove(old)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    _remove(old)


class AtomicModelParallelStrategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy (FSDP2) with atomic distributed checkpoints."""

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Optional[Any] = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        tmp = path.with_name(path.name + ".tmp")
        if self.global_rank == 0:
            _remove(tmp)
        self.barrier("segany_ckpt_tmp_clean")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("segany_ckpt_written")
        if self.global_rank == 0:
            replace_dir(tmp, path)
        self.barrier("segany_ckpt_swapped")


def resolve_checkpoint(path) -> Optional[str]:
    """`path` if it exists, else its `.old` sibling left by an interrupted directory swap,
    else None."""
    p = Path(path)
    if p.exists():
        return str(p)
    old = p.with_name(p.name + ".old")
    return str(old) if old.exists() else None
