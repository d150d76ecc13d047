"""Foreign weights in and out: the release's SAM .pth, and MAE / timm ViT encoders.

The release names the image encoder's MLP `mlp.lin1/lin2`; timm (and segany) name it
`mlp.fc1/fc2`. Everything else has the same key names.
"""

import math
import os
import tempfile
from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed, resample_abs_pos_embed_nhwc
from timm.models.vision_transformer_sam import checkpoint_filter_fn as sam_checkpoint_filter

ENCODER = "image_encoder."


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Load a .pth (plain tensors only) and unwrap a `model` / `state_dict` entry."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle garbage, non-tensor objects
        raise CheckpointError(f"cannot read checkpoint {path!r} (truncated or not a torch file?): {e}") from e
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


def load_official(model: nn.Module, path: str) -> None:
    """Load a release-format SAM .pth into a segany `Sam` strictly."""
    given = from_official(read_state_dict(path))
    expected = model.state_dict()
    problems = _mismatch_report(expected, given)
    if problems:
        raise CheckpointError(
            f"checkpoint {path!r} does not match the model "
            f"(is it an official SAM checkpoint of this size?):\n" + "\n".join(problems)
        )
    model.load_state_dict(given, strict=True)


def atomic_torch_save(obj, path: str) -> None:
    """Write to a temporary file beside `path`, then rename: a crash never leaves half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".pth")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_official(model: nn.Module, path: str) -> None:
    """Write `model` as a release-format SAM .pth (fp32, CPU), loadable by `segment_anything`."""
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    atomic_torch_save(to_official(sd), path)


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
