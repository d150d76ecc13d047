"""Foreign weights in and out: the release's SAM .pth, and MAE / timm ViT encoders; the
safe file load every checkpoint reader goes through.

The release names the image encoder's MLP `mlp.lin1/lin2`; timm (and segany) name it
`mlp.fc1/fc2`. Everything else has the same key names.

A checkpoint is data, never code: files are unpickled with `weights_only=True` (tensors and
plain containers); one that needs more is refused, naming the file and the Python object it
carried, unless the caller opts in for that one file (`trust=True`).
"""

import math
import os
import pickle
import re
from dataclasses import asdict, dataclass
from typing import Dict, List

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed, resample_abs_pos_embed_nhwc
from timm.models.vision_transformer_sam import checkpoint_filter_fn as sam_checkpoint_filter

from segany.modeling.lora import merge_lora
from segany.utils.io import atomic_torch_save, atomic_write_json

ENCODER = "image_encoder."


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


# build_sam keywords that are training switches, not architecture: never stored as the
# architecture of a checkpoint, always the caller's own
TRAINING_SWITCHES = ("drop_path_rate", "decoder_dropout", "grad_checkpointing")
TRUST_HINT = (
    "A checkpoint is data, not code. Only if you trust this file, opt in for it: "
    "trust_checkpoint=True (build_sam / load_model), --trust-checkpoint (python -m segany.export / segany.engine)"
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


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Load a .pth (plain tensors only) and unwrap a `model` / `state_dict` entry."""
    obj = torch_load(path)
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path!r} is not a state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


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


def _mismatch_report(expected: Dict[str, torch.Tensor], given: Dict[str, torch.Tensor]) -> List[str]:
    lines = []
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    wrong = [
        f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in given and given[k].shape != expected[k].shape
    ]
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            shown = keys[:20] + ([f"... and {len(keys) - 20} more"] if len(keys) > 20 else [])
            lines.append(f"{len(keys)} {title} key(s):\n    " + "\n    ".join(shown))
    return lines


def load_weights(model: nn.Module, state_dict: Dict[str, torch.Tensor], path: str) -> None:
    """Load segany-named weights into `model` strictly; a mismatch lists what does not fit."""
    problems = _mismatch_report(model.state_dict(), state_dict)
    if problems:
        raise CheckpointError(
            f"checkpoint {path!r} does not match the model "
            f"(is it a SAM checkpoint of this size?):\n" + "\n".join(problems)
        )
    model.load_state_dict(state_dict, strict=True)


def load_official(model: nn.Module, path: str) -> None:
    """Load a release-format SAM .pth into a segany `Sam` strictly."""
    load_weights(model, from_official(read_state_dict(path)), path)


def sidecar_path(path: str) -> str:
    """`sam_vit_h.pth` -> `sam_vit_h.json`: the architecture of an exported .pth. The release's
    builder loads the .pth strictly (no room for extra keys), so it goes beside it."""
    return os.path.splitext(path)[0] + ".json"


def architecture(config) -> dict:
    """A `SamConfig` -> the build_sam config node that rebuilds it (training switches left out)."""
    arch = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items() if k not in TRAINING_SWITCHES}
    return {"_target_": "segany.build_sam", **arch}


def write_sidecar(path: str, config) -> str:
    """Write `architecture(config)` as JSON beside the weights file `path`; returns its path."""
    out = sidecar_path(path)
    atomic_write_json(out, architecture(config), indent=1)
    return out


def save_official(model: nn.Module, path: str) -> None:
    """Write `model` as a release-format SAM .pth (fp32, CPU), loadable by `segment_anything`,
    and its architecture as `<name>.json` beside it (read back by `build_sam(checkpoint=...)`).
    LoRA adapters (`build_sam(lora=...)`) are merged into the weights they adapt."""
    sd = merge_lora(model.state_dict(), getattr(model, "lora", None), f"model saved to {path!r}")
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}
    atomic_torch_save(to_official(sd), path)
    if getattr(model, "config", None) is not None:
        write_sidecar(path, model.config)


@dataclass
class InitReport:
    loaded: List[str]
    unused: List[str]  # in the checkpoint, not used by the encoder
    not_initialised: List[str]  # in the encoder, left at their fresh init (rel-pos, neck)

    def __str__(self) -> str:
        return f"{len(self.loaded)} tensors loaded; unused: {self.unused}; left at init: {self.not_initialised}"


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, [1 +] g*g, C) or (1, g, g, C) -> (1, grid, grid, C), dropping a class token, bicubic
    (timm's ``resample_abs_pos_embed[_nhwc]``, without antialiasing: plain bicubic upsampling).
    Only the class-token detection is ours: timm needs the number of prefix tokens given."""
    if pos_embed.dim() == 4:
        return resample_abs_pos_embed_nhwc(pos_embed, [grid, grid], antialias=False)
    n = pos_embed.shape[1]
    if math.isqrt(n - 1) ** 2 == n - 1:  # MAE / timm ViT: a class token first
        pos_embed = pos_embed[:, 1:]
    elif math.isqrt(n) ** 2 != n:
        raise CheckpointError(f"pos_embed with {n} tokens is not a square grid")
    resized = resample_abs_pos_embed(pos_embed, [grid, grid], num_prefix_tokens=0, antialias=False)
    return resized.reshape(1, grid, grid, -1)  # (1, grid*grid, C) -> (1, grid, grid, C)


def load_mae_encoder(encoder: nn.Module, path: str) -> InitReport:
    """Load an MAE-pretrained ViT (MAE or timm key names) into the image encoder."""
    given = read_state_dict(path)
    given = {k.removeprefix("encoder."): v for k, v in given.items()}
    expected = encoder.state_dict()
    grid = expected["pos_embed"].shape[1]
    if "pos_embed" in given:
        given["pos_embed"] = resize_pos_embed(given["pos_embed"], grid)
    usable = {k: v for k, v in given.items() if k in expected}
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs encoder {tuple(expected[k].shape)}"
        for k, v in usable.items()
        if v.shape != expected[k].shape
    ]
    if wrong:
        raise CheckpointError(f"MAE checkpoint {path!r} does not fit this encoder size:\n    " + "\n    ".join(wrong))
    if not any(k.startswith("blocks.") for k in usable):
        raise CheckpointError(f"{path!r} holds no ViT blocks with timm/MAE key names (blocks.N.attn.qkv ...)")
    encoder.load_state_dict(usable, strict=False)
    return InitReport(
        loaded=sorted(usable),
        unused=sorted(set(given) - set(usable)),
        not_initialised=sorted(set(expected) - set(usable)),
    )
