"""SAM weights out, in the release's format: `save_official(model, path)` and
`export(checkpoint, out)` (a train.py checkpoint of any kind -> the release .pth; its command
line is `python -m segany.export`). Both write through `write_official`: fp32, CPU, release key
names (`mlp.lin1/lin2`), atomically (segany.utils.io), loadable by `segment_anything`; the
architecture goes as `<name>.json` beside the weights (the release's builder loads the .pth
strictly, no room for extra keys), read back by `read_checkpoint`. `export(..., format=)`
also writes the same weights as a `.safetensors` file (release names, the same `<name>.json`
beside it: `write_safetensors`) or as a transformers SamModel directory (config.json +
model.safetensors: `write_hf`; key and architecture mapping in hf.py).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from typing import Dict, Optional

import torch
import torch.nn as nn
from safetensors.torch import save as safetensors_bytes

from segany.modeling.checkpoint.hf import (
    HF_CONFIG,
    HF_PREPROCESSOR,
    HF_WEIGHTS,
    SAFETENSORS,
    hf_config,
    hf_preprocessor,
    to_hf,
)
from segany.modeling.checkpoint.load import check_fits, config_for
from segany.modeling.checkpoint.read import ANCHOR, read_checkpoint, sidecar_path, to_official
from segany.modeling.checkpoint.trust import CheckpointError
from segany.modeling.lora import merge_lora
from segany.modeling.sam import assemble
from segany.modeling.variants import TRAINING_SWITCHES, SamConfig
from segany.utils.io import atomic_torch_save, atomic_write, atomic_write_json

log = logging.getLogger(__name__)

FORMATS = ("pth", "safetensors", "hf")  # export's --format: the release .pth (default), a .safetensors, SamModel


def architecture(config: SamConfig) -> dict:
    """A `SamConfig` -> the build_sam config node that rebuilds it (training switches left out)."""
    arch = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items() if k not in TRAINING_SWITCHES}
    return {"_target_": "segany.build_sam", **arch}


def write_official(
    state_dict: Dict[str, torch.Tensor], path: str, config: Optional[SamConfig]
) -> Dict[str, torch.Tensor]:
    """segany-named SAM weights -> `path` in the release format, and `architecture(config)`
    beside it as `<name>.json` (none when config is None); returns what was written."""
    return _write_release_named(state_dict, path, config, atomic_torch_save)


def _fp32(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}


def _write_release_named(state_dict, path: str, config: Optional[SamConfig], save) -> Dict[str, torch.Tensor]:
    """fp32 release-named weights saved to `path` by `save(tensors, path)`, the architecture beside them."""
    official = to_official(_fp32(state_dict))
    save(official, path)
    if config is not None:
        atomic_write_json(sidecar_path(path), architecture(config), indent=1)
    return official


def _save_safetensors(tensors: Dict[str, torch.Tensor], path: str) -> None:
    # metadata format "pt": what transformers' from_pretrained asks of a safetensors file
    data = safetensors_bytes(tensors, metadata={"format": "pt"})
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_safetensors(
    state_dict: Dict[str, torch.Tensor], path: str, config: Optional[SamConfig]
) -> Dict[str, torch.Tensor]:
    """As `write_official`, in safetensors: release names, fp32, `<name>.json` beside it."""
    return _write_release_named(state_dict, path, config, _save_safetensors)


def write_hf(state_dict: Dict[str, torch.Tensor], out_dir: str, config: SamConfig) -> Dict[str, torch.Tensor]:
    """segany-named SAM weights -> a transformers SamModel directory `out_dir`: config.json +
    model.safetensors, which `SamModel.from_pretrained(out_dir)` loads (hf.py's mapping), and
    preprocessor_config.json, for `SamProcessor.from_pretrained(out_dir)`."""
    tensors = to_hf(_fp32(state_dict), config)
    hf = hf_config(config)  # refuses what SamModel cannot hold, before anything is written
    os.makedirs(out_dir, exist_ok=True)
    _save_safetensors(tensors, os.path.join(out_dir, HF_WEIGHTS))
    atomic_write_json(os.path.join(out_dir, HF_CONFIG), hf, indent=2)
    atomic_write_json(os.path.join(out_dir, HF_PREPROCESSOR), hf_preprocessor(config), indent=2)
    return tensors


def save_official(model: nn.Module, path: str) -> None:
    """Write `model` as a release-format SAM .pth with its architecture beside it.
    LoRA adapters (`build_sam(lora=...)`) are merged into the weights they adapt."""
    sd = merge_lora(model.state_dict(), getattr(model, "lora", None), f"model saved to {path!r}")
    write_official(sd, path, getattr(model, "config", None))


def export(
    checkpoint: str,
    out: str,
    *,
    prefix: Optional[str] = None,
    variant: Optional[str] = None,
    trust_checkpoint: bool = False,
    format: str = "pth",
) -> Dict[str, torch.Tensor]:
    """Write `checkpoint`'s SAM weights (a train.py .ckpt, an FSDP directory, a state_dict) to
    `out` in `format` (FORMATS: the release .pth; a .safetensors file, `.safetensors` added to
    `out` when it lacks it; "hf": a SamModel directory `out`), checked against the architecture
    the checkpoint stores or its shapes show (`variant` may only repeat it; it is the size to check against when neither
    tells one); returns what was written. `prefix`: the key prefix before `image_encoder.`
    when the file holds several models."""
    if format not in FORMATS:
        raise ValueError(f"export format {format!r}: choose one of {FORMATS}")
    ck = read_checkpoint(checkpoint, prefix=prefix, trust=trust_checkpoint)
    if ANCHOR not in ck.state_dict:
        raise CheckpointError(
            f"{checkpoint!r} holds no SAM weights: no key ending in '{ANCHOR}' under 'state_dict', 'model' "
            f"or at the top level (keys: {sorted(ck.state_dict)[:10]})"
        )
    if ck.model_config is None and variant is None:
        raise CheckpointError(
            f"{checkpoint!r}: its architecture is neither stored nor readable from its tensor shapes "
            f"(not a whole SAM?); pass --variant to check it against a size"
        )
    arch = config_for(ck, variant, {})
    with torch.device("meta"):
        expected = assemble(arch).state_dict()
    check_fits(expected, ck.state_dict, ck.path)
    if format == "safetensors":
        out = out if out.endswith(SAFETENSORS) else out + SAFETENSORS
        written = write_safetensors(ck.state_dict, out, arch)
    elif format == "hf":
        written = write_hf(ck.state_dict, out, arch)
    else:
        written = write_official(ck.state_dict, out, arch)
    log.info("%s -> %s (%d tensors)", checkpoint, out, len(written))
    return written
