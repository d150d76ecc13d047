"""Training checkpoint -> the release's SAM .pth (loadable by `segment_anything` and by
`segany.build_sam(variant, checkpoint=...)`).

    python -m segany.export runs/vit_h_sa1b_123/checkpoints/last.ckpt sam_vit_h.pth

Reads either
  * a single-file Lightning checkpoint (DDP, one device, or ModelParallelStrategy with
    save_distributed_checkpoint=false): weights under "state_dict" with a prefix such as
    "model." (the LightningModule attribute) in front of "image_encoder."; or a plain
    state_dict (already release format, or segany names);
  * a sharded torch.distributed.checkpoint directory (ModelParallelStrategy / FSDP2 with
    save_distributed_checkpoint=true; holds `.metadata` and `*.distcp`): consolidated with
    `dcp_to_torch_save` into a temporary file first (it holds the optimiser state too, so
    it needs about 4x the model size in RAM and disk; the temporary file goes beside the
    output unless --tmp-dir says otherwise).
The weights are written fp32, release key names (`mlp.lin1/lin2`), atomically.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from typing import Dict, Optional

import torch

from segany.modeling.checkpoint import CheckpointError, _mismatch_report, from_official, to_official
from segany.utils.io import atomic_torch_save

log = logging.getLogger(__name__)

PARTS = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
ANCHOR = "image_encoder.patch_embed.proj.weight"
# wrapper modules that can sit inside a key: torch.compile, activation checkpointing, DDP/DataParallel
_WRAPPERS = {"_orig_mod", "_checkpoint_wrapped_module", "module"}


def _load_file(path: str, trust_pickle: bool) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=True)
    except RuntimeError as e:  # mmap needs the zip format; retry plainly
        if "mmap" not in str(e):
            raise _read_error(path, e, trust_pickle) from e
    except Exception as e:
        raise _read_error(path, e, trust_pickle) from e
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:
        raise _read_error(path, e, trust_pickle) from e


def _read_error(path: str, e: Exception, trust_pickle: bool) -> CheckpointError:
    hint = (
        ""
        if trust_pickle
        else (
            " If it is a checkpoint you trust that stores Python objects (e.g. hyper-parameters), pass --trust-pickle."
        )
    )
    return CheckpointError(
        f"cannot read checkpoint {path!r} (truncated or not a torch file?): {type(e).__name__}: {e}.{hint}"
    )


def _consolidate(directory: str, tmp_dir: Optional[str], trust_pickle: bool) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    if not os.path.isfile(os.path.join(directory, ".metadata")):
        raise CheckpointError(
            f"{directory!r} is a directory but not a torch.distributed.checkpoint "
            f"(no .metadata file); expected a sharded Lightning checkpoint or a .ckpt/.pth file"
        )
    with tempfile.TemporaryDirectory(dir=tmp_dir, prefix=".segany-export-") as tmp:
        consolidated = os.path.join(tmp, "consolidated.pt")
        try:
            dcp_to_torch_save(directory, consolidated)
        except Exception as e:
            raise CheckpointError(
                f"cannot consolidate the sharded checkpoint {directory!r}: {type(e).__name__}: {e}"
            ) from e
        obj = torch.load(consolidated, map_location="cpu", weights_only=not trust_pickle)
    return obj


def _find_state_dict(obj, path: str) -> Dict[str, torch.Tensor]:
    """The dict of tensors that holds SAM's weights (Lightning's `state_dict`, a `model`
    entry, or the object itself)."""
    candidates = [obj]
    if isinstance(obj, dict):
        candidates = [obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), dict)] + [obj]
    for c in candidates:
        if isinstance(c, dict) and any(isinstance(k, str) and ANCHOR in _clean(k) for k in c):
            return {k: v for k, v in c.items() if isinstance(v, torch.Tensor)}
    top = sorted(map(str, obj))[:10] if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(
        f"{path!r} holds no SAM weights: no key ending in '{ANCHOR}' under 'state_dict', "
        f"'model' or at the top level (top-level keys: {top})"
    )


def _clean(key: str) -> str:
    return ".".join(part for part in key.split(".") if part not in _WRAPPERS)


def sam_state_dict(
    state_dict: Dict[str, torch.Tensor], path: str = "<state_dict>", prefix: Optional[str] = None
) -> Dict[str, torch.Tensor]:
    """Keys `<prefix>image_encoder....` etc. -> segany names without prefix. The prefix is
    what precedes `image_encoder.patch_embed.proj.weight`; it must be unique unless given."""
    sd = {_clean(k): v for k, v in state_dict.items()}
    if prefix is None:
        prefixes = sorted({k[: -len(ANCHOR)] for k in sd if k.endswith(ANCHOR)})
        if len(prefixes) != 1:
            raise CheckpointError(
                f"{path!r}: {'no' if not prefixes else 'several'} SAM model(s) found "
                f"(prefixes before '{ANCHOR}': {prefixes}); pass --prefix"
            )
        prefix = prefixes[0]
    out = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix) and k[len(prefix) :].startswith(PARTS)}
    missing_parts = [p.rstrip(".") for p in PARTS if not any(k.startswith(p) for k in out)]
    if missing_parts:
        raise CheckpointError(f"{path!r}: the SAM weights under prefix {prefix!r} lack {missing_parts}")
    # the release uses the same names except the encoder MLP; accept either spelling
    return from_official(out)


def _check_against_variant(sd: Dict[str, torch.Tensor], path: str, variant: Optional[str]) -> Optional[str]:
    """Compare keys and shapes with `build_sam(variant)` built on the meta device. With no
    variant given, the one whose embed dim and depth fit is tried; None if no size fits."""
    from segany.modeling.build import VARIANTS, build_sam

    if variant is None:
        embed = sd[ANCHOR].shape[0]
        depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("image_encoder.blocks."))
        img = sd["image_encoder.pos_embed"].shape[1] * 16 if "image_encoder.pos_embed" in sd else None
        fits = [
            v
            for v, c in VARIANTS.items()
            if c.embed_dim == embed and c.depth == depth and (img is None or c.img_size == img)
        ]
        if not fits:
            log.warning("%s: no standard SAM size has embed %d, depth %d; written unchecked", path, embed, depth)
            return None
        variant = fits[0]
    with torch.device("meta"):
        expected = build_sam(variant).state_dict()
    problems = _mismatch_report(expected, sd)
    if problems:
        raise CheckpointError(f"{path!r}: the SAM weights do not match build_sam({variant!r}):\n" + "\n".join(problems))
    return variant


def load_sam_weights(
    path: str, prefix: Optional[str] = None, tmp_dir: Optional[str] = None, trust_pickle: bool = False
) -> Dict[str, torch.Tensor]:
    """Any supported checkpoint (file or sharded directory) -> segany-named SAM state_dict."""
    if os.path.isdir(path):
        obj = _consolidate(path, tmp_dir, trust_pickle)
    elif os.path.isfile(path):
        obj = _load_file(path, trust_pickle)
    else:
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    return sam_state_dict(_find_state_dict(obj, path), path, prefix)


def export(
    ckpt: str,
    out: str,
    *,
    prefix: Optional[str] = None,
    variant: Optional[str] = None,
    tmp_dir: Optional[str] = None,
    trust_pickle: bool = False,
) -> Dict[str, torch.Tensor]:
    """Write `ckpt`'s SAM weights to `out` in the release format; returns what was written."""
    if tmp_dir is None:
        tmp_dir = os.path.dirname(os.path.abspath(out))
        os.makedirs(tmp_dir, exist_ok=True)
    sd = load_sam_weights(ckpt, prefix=prefix, tmp_dir=tmp_dir, trust_pickle=trust_pickle)
    found = _check_against_variant(sd, ckpt, variant)
    official = to_official({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()})
    atomic_torch_save(official, out)
    log.info("%s -> %s (%s, %d tensors)", ckpt, out, found or "unchecked size", len(official))
    return official


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m segany.export", description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="Lightning .ckpt file, sharded checkpoint directory, or a state_dict .pth")
    p.add_argument("out", help="output .pth (release SAM format)")
    p.add_argument("--prefix", default=None, help="key prefix before 'image_encoder.' (default: detected)")
    p.add_argument("--variant", default=None, help="check against build_sam(VARIANT) (default: inferred)")
    p.add_argument("--tmp-dir", default=None, help="where a sharded checkpoint is consolidated (default: beside OUT)")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow arbitrary pickled objects in the checkpoint (only for files you trust)",
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        export(a.ckpt, a.out, prefix=a.prefix, variant=a.variant, tmp_dir=a.tmp_dir, trust_pickle=a.trust_pickle)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
