"""The trust rule: a checkpoint is data, never code.

Files are unpickled with `weights_only=True` (tensors and plain containers); one that needs
more is refused, naming the file and the Python object it carried, unless the caller opts in
for that one file (`trust=True`, spelled `trust_checkpoint` at every entry point).

torch.distributed.checkpoint itself unpickles `.metadata` with plain `pickle.load` and
non-tensor entries with `torch.load(weights_only=False)`; `SafeFileSystemReader` and
`SafeLoadPlanner` replace those two steps (everything else is the library's). Reading a
sharded checkpoint (read.py) and resuming from one (segany/training/checkpointing.py) both
go through `load_distributed`.
"""

from __future__ import annotations

import os
import pickle
import re

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


TRUST_HINT = (
    "A checkpoint is data, not code. Only if you trust this file, opt in for it: trust_checkpoint=true "
    "(evaluate.py), model.trust_checkpoint=true (train.py), --trust-checkpoint (python -m segany.export / "
    "segany.engine / segany.annotate), trust_checkpoint=True (build_sam / load_model / export)"
)


def unsafe_error(path, what: str) -> CheckpointError:
    """The error for a file that carries `what` (a Python global) beyond tensors and plain containers."""
    return CheckpointError(
        f"refusing to unpickle checkpoint {str(path)!r}: it carries the Python object {what}. {TRUST_HINT}"
    )


def refused_global(e: Exception) -> str:
    """The global named in torch's weights-only refusal ("Unsupported global: GLOBAL x.y ...")."""
    found = re.search(r"GLOBAL (\S+)", str(e))
    return found.group(1) if found else str(e)


def torch_load(path, trust: bool = False, map_location="cpu"):
    """torch.load a checkpoint file as data (`weights_only`, mmap when the zip format allows)."""
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    for mmap in (True, False):
        try:
            return torch.load(path, map_location=map_location, weights_only=not trust, mmap=mmap)
        except pickle.UnpicklingError as e:
            if "Unsupported global" in str(e):
                raise unsafe_error(path, refused_global(e)) from e
            raise CheckpointError(f"cannot read checkpoint {path!r} (truncated or not a torch file?): {e}") from e
        except RuntimeError as e:
            if mmap and "mmap" in str(e):  # mmap needs the zip format; retry plainly
                continue
            raise CheckpointError(f"cannot read checkpoint {path!r} (truncated or not a torch file?): {e}") from e
        except Exception as e:  # truncated zip, pickle garbage
            raise CheckpointError(f"cannot read checkpoint {path!r} (truncated or not a torch file?): {e}") from e


# ----------------------------------------------------------------- torch.distributed.checkpoint


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata` allowing only the classes it is made of. Hand-written:
    FileSystemReader uses plain pickle.load, and torch's weights-only unpickler does not
    accept the protocol-4 frames DCP writes."""

    ALLOWED = {
        "torch.distributed.checkpoint.metadata": {
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        },
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo", "_StoragePrefix"},
        "torch.serialization": {"_get_layout"},
        "torch": {"Size"},
        "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
        "pathlib._local": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
        "collections": {"OrderedDict"},
    }

    def find_class(self, module: str, name: str):
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if is_dtype or name in self.ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose `.metadata` is unpickled with `_MetadataUnpickler`."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = os.path.join(str(self.path), ".metadata")
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise unsafe_error(path, refused_global(e)) from e
        except Exception as e:
            raise CheckpointError(f"cannot read {path!r} (truncated or not a distributed checkpoint?): {e}") from e
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path!r} is not torch.distributed.checkpoint metadata ({type(metadata).__name__})")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor entries (optimiser hyper-parameters...) must load
    with `weights_only=True`; only then does the library's own `load_bytes` take them."""

    def __init__(self, path, **kwargs):
        super().__init__(**kwargs)
        self._path = str(path)

    def load_bytes(self, read_item, value) -> None:
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            where = f"{self._path} entry {read_item.dest_index.fqn}"
            raise unsafe_error(where, refused_global(e)) from e
        value.seek(0)
        super().load_bytes(read_item, value)


def dcp_reader(path, trust: bool = False) -> FileSystemReader:
    """The storage reader of DCP directory `path`: the library's when trusted, else the safe one."""
    if not os.path.isfile(os.path.join(str(path), ".metadata")):
        raise CheckpointError(
            f"{str(path)!r} is a directory but not a torch.distributed.checkpoint "
            f"(no .metadata file); expected a sharded Lightning checkpoint or a .ckpt/.pth file"
        )
    return FileSystemReader(path) if trust else SafeFileSystemReader(path)


def load_distributed(state: dict, path, trust: bool = False, no_dist: bool = False) -> None:
    """dcp.load `state` in place from directory `path`: with the process group when one is set
    up (every rank calls it: resume), or by this process alone (`no_dist`)."""
    reader = dcp_reader(path, trust)
    planner = DefaultLoadPlanner() if trust else SafeLoadPlanner(path)
    try:
        dcp.load(state, storage_reader=reader, planner=planner, no_dist=no_dist)
    except CheckpointException as e:  # the ranks' exceptions, wrapped: surface ours as it is
        ours = [f[0] for f in e.failures.values() if isinstance(f[0], CheckpointError)]
        if ours:
            raise ours[0] from None
        raise CheckpointError(f"cannot read the distributed checkpoint {str(path)!r}: {e}") from e
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot read the distributed checkpoint {str(path)!r}: {type(e).__name__}: {e}") from e
