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
train.py's final one all go through them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from lightning_fabric.plugins import TorchCheckpointIO
from pytorch_lightning.strategies import ModelParallelStrategy

from segany.utils.io import OLD_SUFFIX, atomic_torch_save, remove, replace_dir

__all__ = ["AtomicCheckpointIO", "AtomicModelParallelStrategy", "replace_dir", "resolve_checkpoint"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file in the target directory, fsync, rename over the target."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint: storage_options are not supported")
        if "://" in str(path):  # object stores: Lightning's own (transactional) write
            return super().save_checkpoint(checkpoint, path)
        atomic_torch_save(checkpoint, path)


class AtomicModelParallelStrategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy (FSDP2) with atomic distributed checkpoints."""

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Optional[Any] = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        tmp = path.with_name(path.name + ".tmp")
        if self.global_rank == 0:
            remove(tmp)
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
    old = p.with_name(p.name + OLD_SUFFIX)
    return str(old) if old.exists() else None
