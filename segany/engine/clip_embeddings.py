"""CLIP crop embeddings of every mask of SA-1B-format shards, the text prompt's training data
(SAM paper §7.5, appendix D.5), computed once ahead of training:

    python -m segany.engine.clip_embeddings --input data/synthetic --clip-model ViT-L-14-336 \
        --clip-checkpoint /models/vit_l_14_336.safetensors

For each mask with area >= --min-area (paper: 100^2 px) a square crop around it, enlarged by a
random factor in --scale (paper: 1x-2x), background zeroed with probability
--p-zero-background (paper: 0.5) (segany.data.clip_crops), goes through the CLIP image tower;
the L2-normalised embeddings go to `<shard>.clip.npz` beside each shard (--out: another
folder), keyed by annotation id (segany.data.formats.clip_sidecar). Train with
data.clip_sidecar=.clip.npz. The crops' random draws are seeded by --seed and the shard name.

Resumable and sharded as the data engine (segany.engine.run.run_jobs): a sidecar that exists
is done, a killed run leaves only a temp file; slot = rank (RANK / WORLD_SIZE, SLURM_PROCID /
SLURM_NTASKS, or --rank/--world-size) writes the shards j with j mod world_size == rank.
Without --clip-checkpoint the CLIP model is randomly initialised (the CPU demonstration);
--clip-config FILE.json builds a custom OpenCLIP architecture ({embed_dim, vision_cfg, text_cfg}).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import zlib

import numpy as np

from segany.data.clip_crops import PAPER_MIN_AREA, PAPER_P_ZERO_BACKGROUND, PAPER_SCALE, sample_crop
from segany.data.decode import decode_image, decode_mask
from segany.data.formats import clip_sidecar
from segany.engine.run import run_jobs
from segany.engine.sources import plan_jobs
from segany.utils.io import atomic_write

log = logging.getLogger("segany.engine")


def shard_embeddings(job, clip, *, min_area: int, scale, p_zero_background: float, seed: int, batch_size: int):
    """-> ids (A,), embeddings (A, D) of the masks of one input job (shard) with area >= min_area."""
    rng = np.random.default_rng([seed, zlib.crc32(job.name.encode())])
    ids, crops, out = [], [], []
    for item in job.items():
        anns = (item.meta or {}).get("annotations") or []
        image = None
        for ann in anns:
            seg = ann["segmentation"]
            mask = decode_mask(seg)
            if int(mask.sum()) < min_area:
                continue
            if image is None:
                image = decode_image(item.data, f"{job.name}:{item.key}")
            crops.append(sample_crop(image, mask, rng, scale, p_zero_background))
            ids.append(int(ann["id"]))
            if len(crops) == batch_size:
                out.append(clip.encode_images(crops).cpu().numpy())
                crops = []
    if crops:
        out.append(clip.encode_images(crops).cpu().numpy())
    emb = np.concatenate(out) if out else np.zeros((0, clip.embed_dim), np.float32)
    return np.array(ids, np.int64), emb


def write_sidecar(job, path: str, clip, settings: dict) -> dict:
    t0 = time.time()
    ids, emb = shard_embeddings(job, clip, **settings)
    with atomic_write(path, "wb") as f:
        clip_sidecar.write(f, ids, emb, {"clip": clip.name, "embed_dim": int(emb.shape[1]), **settings})
    return {"masks": len(ids), "masks_per_s": round(len(ids) / max(time.time() - t0, 1e-9), 2)}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m segany.engine.clip_embeddings",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", required=True, help="SA-1B-format shards: a folder of *.tar, a glob, a list file")
    p.add_argument("--out", default=None, help="folder of the sidecars (default: beside the shards)")
    p.add_argument("--clip-model", default=None, help="OpenCLIP model name (paper: ViT-L-14-336)")
    p.add_argument("--clip-config", default=None, help="JSON file of a custom OpenCLIP config (instead of a name)")
    p.add_argument("--clip-checkpoint", default=None, help="local CLIP weights (none: random init)")
    p.add_argument("--min-area", type=int, default=PAPER_MIN_AREA, help="px at the stored resolution (paper: 100^2)")
    p.add_argument("--scale", type=float, nargs=2, default=list(PAPER_SCALE), help="crop enlargement range")
    p.add_argument("--p-zero-background", type=float, default=PAPER_P_ZERO_BACKGROUND)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="crops per CLIP forward")
    p.add_argument("--device", default="auto")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--world-size", type=int, default=None)
    return p


def main(argv=None) -> int:
    from segany.modeling.checkpoint import CheckpointError
    from segany.modeling.clip import build_clip
    from segany.utils.dist import pick_device, topology

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(name)s: %(message)s")
    a = parser().parse_args(argv)
    rank, world = topology(a.rank, a.world_size)
    jobs = plan_jobs(a.input)
    out = a.out or (a.input if os.path.isdir(a.input) else os.path.dirname(a.input))
    config = None
    if a.clip_config:
        with open(a.clip_config) as f:
            config = json.load(f)
    import torch

    torch.manual_seed(a.seed)  # a randomly initialised CLIP (no --clip-checkpoint) is the same on every run
    try:
        clip = build_clip(a.clip_model, a.clip_checkpoint, config).to(pick_device(a.device))
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    settings = dict(
        min_area=a.min_area,
        scale=[float(s) for s in a.scale],
        p_zero_background=a.p_zero_background,
        seed=a.seed,
        batch_size=a.batch_size,
    )
    t0 = time.time()
    totals = run_jobs(
        jobs,
        lambda job, path: write_sidecar(job, path, clip, settings),
        out,
        rank,
        world,
        out_name=lambda job: os.path.basename(clip_sidecar.sidecar_path(job.name)),
    )
    totals.pop("masks_per_s", None)
    seconds = time.time() - t0
    print(
        json.dumps(
            {
                "rank": rank,
                "world_size": world,
                **totals,
                "seconds": round(seconds, 1),
                "masks_per_s": round(totals.get("masks", 0) / max(seconds, 1e-9), 2),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
