"""Command line of the data engine:

    python -m segany.engine {auto,semi} --input IN --out OUT [--checkpoint CKPT] [options]

Rank and world size default to the launcher's (RANK / WORLD_SIZE, SLURM_PROCID /
SLURM_NTASKS); --workers N runs N processes per rank, each with its own model. Output shard
j is written by slot j mod (world_size x workers).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from segany.engine.annotate import MAX_AREA_FRAC, SA1B_SETTINGS
from segany.utils.cli import add_checkpoint_args, add_precision_arg

log = logging.getLogger("segany.engine")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m segany.engine",
        description=__doc__.split("\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="stage", required=True)
    for name, help_ in (
        ("auto", "fully automatic stage: SA-1B mask generation on unlabelled images"),
        ("semi", "semi-automatic stage: add masks in the unannotated area of SA-1B shards"),
    ):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--input", required=True, help="folder of images, or SA-1B-format shards (spec)")
        s.add_argument("--out", required=True, help="output folder of SA-1B-format shards")
        add_checkpoint_args(s, "train.py .ckpt, FSDP checkpoint directory or SAM .pth (none: untrained)")
        s.add_argument("--model", default="vit_tiny", help="size when the checkpoint stores none / no checkpoint")
        s.add_argument("--device", default="auto")
        add_precision_arg(s)
        s.add_argument("--shard-size", type=int, default=1000, help="images per output shard (folder input)")
        s.add_argument("--rank", type=int, default=None)
        s.add_argument("--world-size", type=int, default=None)
        s.add_argument("--workers", type=int, default=1, help="processes per rank")
        s.add_argument("--points-per-side", type=int, default=SA1B_SETTINGS["points_per_side"])
        s.add_argument("--points-per-batch", type=int, default=SA1B_SETTINGS["points_per_batch"])
        s.add_argument("--pred-iou-thresh", type=float, default=SA1B_SETTINGS["pred_iou_thresh"])
        s.add_argument("--stability-score-thresh", type=float, default=SA1B_SETTINGS["stability_score_thresh"])
        s.add_argument("--box-nms-thresh", type=float, default=SA1B_SETTINGS["box_nms_thresh"])
        s.add_argument("--min-mask-region-area", type=int, default=SA1B_SETTINGS["min_mask_region_area"])
        s.add_argument("--max-area-frac", type=float, default=MAX_AREA_FRAC)
        if name == "auto":
            s.add_argument("--crop-n-layers", type=int, default=SA1B_SETTINGS["crop_n_layers"])
            s.add_argument("--crop-nms-thresh", type=float, default=SA1B_SETTINGS["crop_nms_thresh"])
            s.add_argument(
                "--crop-n-points-downscale-factor", type=int, default=SA1B_SETTINGS["crop_n_points_downscale_factor"]
            )
        else:
            s.add_argument("--min-predicted-iou", type=float, default=0.88, help="existing masks kept as confident")
            s.add_argument("--min-stability", type=float, default=0.95)
            s.add_argument(
                "--max-overlap",
                type=float,
                default=0.5,
                help="drop new masks with more than this fraction on annotated pixels",
            )
    return p


def build_annotator(args, model):
    from segany.engine.annotate import AutoAnnotator, SemiAnnotator

    common = dict(
        points_per_batch=args.points_per_batch,
        pred_iou_thresh=args.pred_iou_thresh,
        stability_score_thresh=args.stability_score_thresh,
        box_nms_thresh=args.box_nms_thresh,
        min_mask_region_area=args.min_mask_region_area,
        max_area_frac=args.max_area_frac,
        precision=args.precision,
    )
    if args.stage == "auto":
        return AutoAnnotator(
            model,
            points_per_side=args.points_per_side,
            crop_n_layers=args.crop_n_layers,
            crop_nms_thresh=args.crop_nms_thresh,
            crop_n_points_downscale_factor=args.crop_n_points_downscale_factor,
            **common,
        )
    return SemiAnnotator(
        model,
        min_predicted_iou=args.min_predicted_iou,
        min_stability=args.min_stability,
        max_overlap=args.max_overlap,
        points_per_side=args.points_per_side,
        **common,
    )


def load(args):
    from omegaconf import OmegaConf

    from segany.modeling.checkpoint import load_model
    from segany.utils.dist import pick_device

    model_cfg = OmegaConf.create({"_target_": "segany.build_sam", "variant": args.model})
    model, what = load_model(args.checkpoint, model_cfg, trust_checkpoint=args.trust_checkpoint)
    return model.to(pick_device(args.device)).eval(), what


def work(args, slot: int, n_slots: int) -> dict:
    """One worker: load the model, annotate this slot's shards."""
    import torch

    from segany.engine.run import run_stage
    from segany.engine.sources import plan_jobs

    if args.workers > 1:
        torch.set_num_threads(1)
    jobs = plan_jobs(args.input, args.shard_size)
    model, what = load(args)
    log.info("slot %d/%d: %s, %d jobs in total", slot, n_slots, what, len(jobs))
    return run_stage(jobs, build_annotator(args, model), args.out, slot, n_slots)


def _spawned(w, args, rank, world, queue):
    queue.put(work(args, rank * args.workers + w, world * args.workers))


def main(argv=None) -> int:
    from segany.utils.dist import topology

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(name)s: %(message)s")
    args = parser().parse_args(argv)
    rank, world = topology(args.rank, args.world_size)
    if args.workers < 1:
        raise SystemExit("--workers must be >= 1")
    from segany.modeling.checkpoint import CheckpointError

    if args.workers == 1:
        try:
            totals = work(args, rank, world)
        except CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    else:
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        queue = ctx.SimpleQueue()
        mp.start_processes(_spawned, args=(args, rank, world, queue), nprocs=args.workers, start_method="spawn")
        results = [queue.get() for _ in range(args.workers)]
        totals = {k: sum(r[k] for r in results) for k in results[0]}
    print(json.dumps({"stage": args.stage, "rank": rank, "world_size": world, **totals}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
