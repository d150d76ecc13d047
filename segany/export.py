"""Training checkpoint -> the release's SAM .pth (loadable by `segment_anything` and by
`segany.build_sam(checkpoint=...)`), with its architecture as `<name>.json` beside it.

    python -m segany.export runs/vit_h_sa1b_123/checkpoints/last.ckpt sam_vit_h.pth

Reads whatever `segany.modeling.reader` reads: a single-file Lightning checkpoint (DDP, one
device, or ModelParallelStrategy with save_distributed_checkpoint=false), a sharded
torch.distributed.checkpoint directory (FSDP2; only the model's tensors are read, no
optimiser state, no process group), or a plain state_dict (release or segany names). Files
are read as data (`weights_only`); --trust-checkpoint opts one trusted file out of that.
The weights are written fp32, release key names (`mlp.lin1/lin2`), atomically. The release's
builder loads the .pth strictly, so the architecture (e.g. a width-128 decoder) goes into the
JSON file that `build_sam`, evaluate.py and the data engine read back.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Dict, Optional

import torch

from segany.modeling.build import VARIANTS, assemble, build_sam, config_for, sam_config
from segany.modeling.checkpoint import CheckpointError, _mismatch_report, to_official, write_sidecar
from segany.modeling.reader import ANCHOR, read_checkpoint
from segany.utils.io import atomic_torch_save

log = logging.getLogger(__name__)


def _check_against_variant(sd: Dict[str, torch.Tensor], path: str, variant: Optional[str]) -> Optional[str]:
    """Compare keys and shapes with `build_sam(variant)` built on the meta device. With no
    variant given, the one whose embed dim and depth fit is tried; None if no size fits."""
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


def export(
    ckpt: str,
    out: str,
    *,
    prefix: Optional[str] = None,
    variant: Optional[str] = None,
    trust_checkpoint: bool = False,
) -> Dict[str, torch.Tensor]:
    """Write `ckpt`'s SAM weights to `out` in the release format (and the architecture to
    `<out name>.json` when known); returns what was written."""
    ck = read_checkpoint(ckpt, prefix=prefix, trust=trust_checkpoint)
    sd = ck.state_dict
    if ANCHOR not in sd:
        raise CheckpointError(
            f"{ckpt!r} holds no SAM weights: no key ending in '{ANCHOR}' under 'state_dict', 'model' "
            f"or at the top level (keys: {sorted(sd)[:10]})"
        )
    if ck.model_config is not None:  # its own architecture (--variant may only repeat the size)
        arch = config_for(ck, variant, {})
        with torch.device("meta"):
            expected = assemble(arch).state_dict()
        problems = _mismatch_report(expected, sd)
        if problems:
            raise CheckpointError(f"{ckpt!r}: the SAM weights do not match its stored config:\n" + "\n".join(problems))
        found = "stored config"
    else:
        found = _check_against_variant(sd, ckpt, variant)
        arch = sam_config(found) if found else None
    official = to_official({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()})
    atomic_torch_save(official, out)
    if arch is not None:
        write_sidecar(out, arch)
    log.info("%s -> %s (%s, %d tensors)", ckpt, out, found or "unchecked size", len(official))
    return official


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m segany.export", description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="Lightning .ckpt file, sharded checkpoint directory, or a state_dict .pth")
    p.add_argument("out", help="output .pth (release SAM format); the architecture goes to <name>.json beside it")
    p.add_argument("--prefix", default=None, help="key prefix before 'image_encoder.' (default: detected)")
    p.add_argument("--variant", default=None, help="check against build_sam(VARIANT) (default: inferred)")
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="unpickle arbitrary Python objects in CKPT (only for a file you trust)",
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        export(a.ckpt, a.out, prefix=a.prefix, variant=a.variant, trust_checkpoint=a.trust_checkpoint)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
