"""One reader for every checkpoint: `read_checkpoint(path) -> Checkpoint`.

It reads, as data (trust.py):
  * a train.py `.ckpt` file: Lightning's dict, weights under "state_dict" as
    "model.<name>", the run's resolved config under "segany_config";
  * a sharded torch.distributed.checkpoint directory (FSDP2 through ModelParallelStrategy):
    `.metadata`, one `*.distcp` per rank, and Lightning's `meta.pt` with the rest of the
    checkpoint (segany_config included). Only the model's tensors are read (not the
    optimiser state), in one process, no process group needed;
  * a state_dict `.pth`: the release's SAM, or export / save_official output, whose
    architecture is the build_sam node in `<name>.json` beside it;
  * a `.safetensors` weights file (release or segany names), its architecture likewise in
    `<name>.json` beside it (or read from its shapes);
  * a Hugging Face `transformers.SamModel` directory: `config.json` (model_type "sam") and
    `model.safetensors` or its shards (`model.safetensors.index.json`); key names and
    architecture mapped by hf.py, without importing transformers.

-> `Checkpoint`: the SAM weights under segany key names, and the build_sam config node the
checkpoint stores. A checkpoint that stores none (a released .pth) gets the architecture its
tensor shapes show (infer.py; `inferred=True`); None only when the weights are not a whole
SAM (then the caller's model config decides). A LoRA run's weights (base + adapters, see
segany.modeling.lora) come merged into the plain SAM layout, with the stored `model.lora`
node's rank and alpha.

Key names: the release names the image encoder's MLP `mlp.lin1/lin2`; timm (and segany) name
it `mlp.fc1/fc2`. Everything else has the same key names.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch
from timm.models.vision_transformer_sam import checkpoint_filter_fn as sam_checkpoint_filter
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from segany.modeling.checkpoint.hf import SAFETENSORS, is_hf_dir, read_hf, read_safetensors
from segany.modeling.checkpoint.infer import infer_architecture
from segany.modeling.checkpoint.manifest import verify_checkpoint
from segany.modeling.checkpoint.trust import CheckpointError, dcp_reader, load_distributed, torch_load
from segany.modeling.lora import has_lora, lora_spec, merge_lora

ENCODER = "image_encoder."
PARTS = (ENCODER, "prompt_encoder.", "mask_decoder.")
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
    kind: str  # "lightning" (.ckpt) | "distributed" (DCP directory) | "state_dict" (.pth, .safetensors) | "hf"
    step: Optional[int] = None
    inferred: bool = False  # model_config read from the tensor shapes, not stored in the checkpoint

    @property
    def description(self) -> str:
        if self.kind in ("state_dict", "hf"):
            return f"{'official ' if self.model_config is None or self.inferred else ''}{self.path}"
        return f"{self.path} (step {self.step})"


# ----------------------------------------------------------------- key names


def from_official(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Release key names -> segany key names: the image encoder's keys through timm's SAM
    ``checkpoint_filter_fn`` (drops ``image_encoder.``, ``mlp.lin`` -> ``mlp.fc``), put back
    under ``image_encoder.``; the other parts' keys as they are."""
    enc = {k: v for k, v in state_dict.items() if k.startswith(ENCODER)}
    rest = {k: v for k, v in state_dict.items() if not k.startswith(ENCODER)}
    return {**{ENCODER + k: v for k, v in sam_checkpoint_filter(enc, None).items()}, **rest}


def to_official(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """segany key names -> release key names. Hand-written: timm has only the release -> timm
    direction (``checkpoint_filter_fn``), this is its inverse."""
    return {k.replace(".mlp.fc", ".mlp.lin") if k.startswith(ENCODER) else k: v for k, v in state_dict.items()}


def _clean(key: str) -> str:
    return ".".join(part for part in key.split(".") if part not in _WRAPPERS)


def _tensor_dict(obj, path: str) -> Dict[str, torch.Tensor]:
    """The dict of tensors holding SAM's weights: Lightning's `state_dict`, a `model` entry,
    or the object itself; the first dict of tensors when none holds SAM."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path!r} holds a {type(obj).__name__}, not a checkpoint dict")
    candidates = [obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), dict)] + [obj]
    for c in candidates:
        if any(isinstance(k, str) and ANCHOR in _clean(k) for k in c):
            return {k: v for k, v in c.items() if isinstance(v, torch.Tensor)}
    for c in candidates:
        tensors = {k: v for k, v in c.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise CheckpointError(f"{path!r} holds no tensors (top-level keys: {sorted(map(str, obj))[:10]})")


def read_tensors(path) -> Dict[str, torch.Tensor]:
    """The tensors of a weights file (e.g. MAE's encoder: its `model` entry), wrapper names
    (`module.`, `_orig_mod.`) dropped from the keys."""
    return {_clean(k): v for k, v in _tensor_dict(torch_load(path), str(path)).items()}


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


# ----------------------------------------------------------------- the stored architecture


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


def sidecar_path(path: str) -> str:
    """`sam_vit_h.pth` -> `sam_vit_h.json`: the architecture of an exported .pth. The release's
    builder loads the .pth strictly (no room for extra keys), so it goes beside it."""
    return os.path.splitext(path)[0] + ".json"


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


# ----------------------------------------------------------------- read


def read_distributed_weights(path, trust: bool = False) -> Dict[str, torch.Tensor]:
    """The full (unsharded) model tensors of a DCP directory: the entries under
    "state_dict." (Lightning's layout; all tensor entries when there is none), in one process."""
    md = dcp_reader(path, trust).read_metadata()
    tensors = {k: m for k, m in md.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}
    keys = [k for k in tensors if k.startswith("state_dict.")] or list(tensors)
    state = {k: torch.empty(tensors[k].size, dtype=tensors[k].properties.dtype) for k in keys}
    with warnings.catch_warnings():  # "no process group: assuming a single process" is what we want
        warnings.simplefilter("ignore", UserWarning)
        load_distributed(state, path, trust, no_dist=True)
    return state


def read_checkpoint(path, *, prefix: Optional[str] = None, trust: bool = False) -> Checkpoint:
    """Any supported checkpoint (file or sharded directory) -> `Checkpoint`, verified first
    against its manifest when it has one (manifest.py). `trust=True` unpickles whatever the
    file holds: only for a file you trust, never a default."""
    path = str(path)
    if os.path.exists(path):
        verify_checkpoint(path)  # a manifest that does not match: refused before anything is read
    if is_hf_dir(path):  # config.json and no DCP .metadata
        (tensors, config), meta, kind = read_hf(path), {}, "hf"
    elif os.path.isdir(path):
        tensors = read_distributed_weights(path, trust)
        meta_file = Path(path) / LIGHTNING_META
        meta = torch_load(meta_file, trust) if meta_file.is_file() else {}
        config, kind = _stored_config(meta, path), "distributed"
    elif os.path.isfile(path) and path.endswith(SAFETENSORS):
        tensors, meta, kind = read_safetensors(path), {}, "state_dict"
        config = _sidecar(path)
    elif os.path.isfile(path):
        meta = torch_load(path, trust)
        tensors = _tensor_dict(meta, path)
        config = _stored_config(meta, path)
        kind = "lightning" if "segany_config" in meta or "global_step" in meta else "state_dict"
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
