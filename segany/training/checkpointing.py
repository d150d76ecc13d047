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

Here, not in segany.modeling.checkpoint, because both classes are Lightning plugins: the
modeling layer (and `import segany`) stays free of pytorch_lightning (tests/test_layers.py).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Optional

from lightning_fabric.plugins import TorchCheckpointIO
from pytorch_lightning.strategies import ModelParallelStrategy

from segany.modeling.checkpoint.read import LIGHTNING_META
from segany.modeling.checkpoint.trust import load_distributed, refused_global, torch_load, unsafe_error
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
        tmp = path.with_name(path.name + ".tmp")
        if self.global_rank == 0:
            remove(tmp)
        self.barrier("segany_ckpt_tmp_clean")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("segany_ckpt_written")
        if self.global_rank == 0:
            replace_dir(tmp, path)
        self.barrier("segany_ckpt_swapped")

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


def resolve_checkpoint(path) -> Optional[str]:
    """`path` if it exists, else its `.old` sibling left by an interrupted directory swap,
    else None."""
    p = Path(path)
    if p.exists():
        return str(p)
    old = p.with_name(p.name + OLD_SUFFIX)
    return str(old) if old.exists() else None
