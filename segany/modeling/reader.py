"""The one checkpoint reader behind evaluate.py, the data engine, `build_sam(checkpoint=...)`
(so SamPredictor users and fine-tuning init via `model.checkpoint=`) and `segany.export`.

It reads, as data (never running code a file carries):
  * a train.py `.ckpt` file: Lightning's dict, weights under "state_dict" as
    "model.<name>", the run's resolved config under "segany_config";
  * a sharded torch.distributed.checkpoint directory (FSDP2 through ModelParallelStrategy):
    `.metadata`, one `*.distcp` per rank, and Lightning's `meta.pt` with the rest of the
    checkpoint (segany_config included). Only the model's tensors are read (not the
    optimiser state), in one process, no process group needed;
  * a state_dict `.pth`: the release's SAM, or segany.export / save_official output, whose
    architecture is the build_sam node in `<name>.json` beside it.

-> `Checkpoint`: the SAM weights under segany key names, and the build_sam config node the
checkpoint stores. A checkpoint that stores none (a released .pth) gets the architecture its
tensor shapes show (segany.modeling.infer; `inferred=True`); None only when the weights are
not a whole SAM (then the caller's model config decides). A LoRA run's weights (base + adapters,
see segany.modeling.lora) come merged into the plain SAM layout, with the stored `model.lora`
node's rank and alpha.

torch.distributed.checkpoint itself unpickles `.metadata` with plain `pickle.load` and
non-tensor entries with `torch.load(weights_only=False)`; `SafeFileSystemReader` and
`SafeLoadPlanner` replace those two steps (everything else is the library's), and the
training strategy resumes through them too (segany/training/checkpointing.py).
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from segany.modeling.checkpoint import (
    CheckpointError,
    from_official,
    refused_global,
    sidecar_path,
    torch_load,
    unsafe_error,
)
from segany.modeling.infer import infer_architecture
from segany.modeling.lora import has_lora, lora_spec, merge_lora

PARTS = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
ANCHOR = "image_encoder.patch_embed.proj.weight"
# wrapper modules that can sit inside a key: torch.compile, activation checkpointing, DDP/DataParallel
_WRAPPERS = {"_orig_mod", "_checkpoint_wrapped_module", "module"}
# the only builders a stored model config may name (it is rebuilt, never instantiated)
BUILDERS = ("segany.build_sam", "segany.modeling.build_sam", "segany.modeling.build.build_sam")
LIGHTNING_META = "meta.pt"  # Lightning's non-tensor part of a sharded checkpoint


@dataclass
class Checkpoint:
    path: str
    state_dict: Dict[str, torch.Tensor]  # segany key names; the SAM model only when it was found
    model_config: Optional[dict]  # build_sam keywords the checkpoint stores (no _target_), or None
    kind: str  # "lightning" (.ckpt file) | "distributed" (DCP directory) | "state_dict" (.pth)
    step: Optional[int] = None
    inferred: bool = False  # model_config read from the tensor shapes, not stored in the checkpoint

    @property
    def description(self) -> str:
        if self.kind == "state_dict":
            return f"{'official ' if self.model_config is None or self.inferred else ''}{self.path}"
        return f"{self.path} (step {self.step})"


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


def _require_dcp(path) -> None:
    if not os.path.isfile(os.path.join(str(path), ".metadata")):
        raise CheckpointError(
            f"{str(path)!r} is a directory but not a torch.distributed.checkpoint "
            f"(no .metadata file); expected a sharded Lightning checkpoint or a .ckpt/.pth file"
        )


def load_distributed(state: dict, path, trust: bool = False, no_dist: bool = False) -> None:
    """dcp.load `state` in place from directory `path`: with the process group when one is set
    up (every rank calls it: resume), or by this process alone (`no_dist`)."""
    _require_dcp(path)
    reader = FileSystemReader(path) if trust else SafeFileSystemReader(path)
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


def read_distributed_weights(path, trust: bool = False) -> Dict[str, torch.Tensor]:
    """The full (unsharded) model tensors of a DCP directory: the entries under
    "state_dict." (Lightning's layout; all tensor entries when there is none), in one process."""
    _require_dcp(path)
    md = SafeFileSystemReader(path).read_metadata() if not trust else FileSystemReader(path).read_metadata()
    tensors = {k: m for k, m in md.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}
    keys = [k for k in tensors if k.startswith("state_dict.")] or list(tensors)
    state = {k: torch.empty(tensors[k].size, dtype=tensors[k].properties.dtype) for k in keys}
    with warnings.catch_warnings():  # "no process group: assuming a single process" is what we want
        warnings.simplefilter("ignore", UserWarning)
        load_distributed(state, path, trust, no_dist=True)
    return state


# ----------------------------------------------------------------- finding SAM in a checkpoint


def _clean(key: str) -> str:
    return ".".join(part for part in key.split(".") if part not in _WRAPPERS)


def _tensor_dict(obj, path: str) -> Dict[str, torch.Tensor]:
    """The dict of tensors holding SAM's weights: Lightning's `state_dict`, a `model` entry,
    or the object itself; the first dict of tensors when none holds SAM."""
    candidates = [obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), dict)] + [obj]
    for c in candidates:
        if any(isinstance(k, str) and ANCHOR in _clean(k) for k in c):
            return {k: v for k, v in c.items() if isinstance(v, torch.Tensor)}
    for c in candidates:
        tensors = {k: v for k, v in c.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise CheckpointError(f"{path!r} holds no tensors (top-level keys: {sorted(map(str, obj))[:10]})")


def sam_weights(
    state_dict: Dict[str, torch.Tensor], path: str, prefix: Optional[str] = None
) -> Dict[str, torch.Tensor]:
    """Keys `<prefix>image_encoder....` etc. -> segany names without prefix. The prefix is what
    precedes `image_encoder.patch_embed.proj.weight`; it must be unique unless given. With no
    SAM in it the dict comes back as it is (the model's strict load lists what does not fit)."""
    sd = {_clean(k): v for k, v in state_dict.items()}
    prefixes = sorted({k[: -len(ANCHOR)] for k in sd if k.endswith(ANCHOR)})
    if prefix is None:
        if not prefixes:
            return from_official(sd)
        if len(prefixes) > 1:
            raise CheckpointError(
                f"{path!r}: several SAM models found (prefixes before '{ANCHOR}': {prefixes}); pass --prefix"
            )
        prefix = prefixes[0]
    out = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix) and k[len(prefix) :].startswith(PARTS)}
    missing_parts = [p.rstrip(".") for p in PARTS if not any(k.startswith(p) for k in out)]
    if missing_parts:
        raise CheckpointError(f"{path!r}: the SAM weights under prefix {prefix!r} lack {missing_parts}")
    return from_official(out)  # the release's names differ only in the encoder MLP; accept either


def model_node(node, where: str) -> dict:
    """A stored build_sam config node -> its keywords. It names its builder; anything but
    build_sam is refused (a checkpoint chooses an architecture, not code to run)."""
    if not isinstance(node, dict):
        raise CheckpointError(f"{where}: the stored model config is a {type(node).__name__}, not a build_sam node")
    target = node.get("_target_", BUILDERS[0])
    if target not in BUILDERS:
        raise CheckpointError(
            f"{where}: its stored model config names _target_={target!r}; a checkpoint's model is "
            f"rebuilt only with segany.build_sam (a checkpoint is data, not code)"
        )
    return {k: v for k, v in node.items() if k != "_target_"}


def _stored_config(meta, path: str) -> Optional[dict]:
    run_cfg = meta.get("segany_config") if isinstance(meta, dict) else None
    if run_cfg is None:
        return None
    if not isinstance(run_cfg, dict) or "model" not in run_cfg:
        raise CheckpointError(f"{path!r}: its segany_config holds no 'model' node")
    return model_node(run_cfg["model"], f"{path!r} (segany_config.model)")


def _sidecar(path: str) -> Optional[dict]:
    side = sidecar_path(path)
    if not os.path.isfile(side):
        return None
    try:
        with open(side) as f:
            node = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the architecture file {side!r} beside {path!r}: {e}") from e
    return model_node(node, repr(side))


def read_checkpoint(path, *, prefix: Optional[str] = None, trust: bool = False) -> Checkpoint:
    """Any supported checkpoint (file or sharded directory) -> `Checkpoint`. `trust=True`
    unpickles whatever the file holds: only for a file you trust, never a default."""
    path = str(path)
    if os.path.isdir(path):
        tensors = read_distributed_weights(path, trust)
        meta_file = Path(path) / LIGHTNING_META
        meta = torch_load(meta_file, trust) if meta_file.is_file() else {}
        config, kind = _stored_config(meta, path), "distributed"
    elif os.path.isfile(path):
        obj = torch_load(path, trust)
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path!r} holds a {type(obj).__name__}, not a checkpoint dict")
        tensors, meta = _tensor_dict(obj, path), obj
        config = _stored_config(obj, path)
        kind = "lightning" if "segany_config" in obj or "global_step" in obj else "state_dict"
        if config is None:
            config = _sidecar(path)
    else:
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    step = meta.get("global_step") if isinstance(meta, dict) else None
    weights = sam_weights(tensors, path, prefix)
    if has_lora(weights):
        try:
            weights = merge_lora(weights, lora_spec((config or {}).get("lora")), repr(path))
        except ValueError as e:
            raise CheckpointError(str(e)) from e
    inferred = config is None and (config := infer_architecture(weights)) is not None
    return Checkpoint(path, weights, config, kind, step, inferred)
