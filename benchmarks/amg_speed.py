"""Automatic mask generation: segany vs the release (`segment_anything`), same weights, real photos.

Both generators run in one process, alternated per image (release, segany fp32, segany bf16),
on the photos of ../shared/data/photos, at the release's defaults (32x32 grid, no crops) and/or
at the data engine's SA-1B setting (segany.engine.annotate.SA1B_SETTINGS: 32x32 grid, 2 crop
layers with 16x16 and 8x8 grids, 100 px small-region cleanup). Weights: --checkpoint (a release-format
.pth of --variant), else random-init weights of --variant (seed 0) written to a temporary file
and loaded by both. Random weights predict low IoUs, so at the default thresholds few or no
masks survive: the timing then measures decode + filtering, not mask encoding; pass a trained
--checkpoint, or lower thresholds (--pred-iou-thresh, --stability-score-thresh), for a mask-agreement
figure with many masks. The release raises an IndexError at the SA-1B setting when no mask
survives in any crop (its final crop NMS indexes an empty tensor, after all crops are done): such a
run is timed to the error, counted as no masks and reported (release_crashed_empty).

Prints per setting: median seconds per image of each implementation, the time ratio, images
per hour, the mask agreement with the release (same record count, identical masks, mean IoU of
the records in order) and, with --bf16, the bf16 figures (its masks matched to segany fp32's
by best IoU).

    python benchmarks/amg_speed.py --variant vit_b --images 2 --max-side 1024 --setting both --bf16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's segany

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos"


def architecture(variant: str, checkpoint, trust: bool = False):
    """segany's architecture numbers: those `checkpoint` stores (its run config, the `.json` beside
    an exported .pth, or its tensor shapes: the loader's own `read_checkpoint` + `config_for`),
    else `variant`'s."""
    from segany.modeling.checkpoint import read_checkpoint
    from segany.modeling.checkpoint.load import config_for

    ck = read_checkpoint(checkpoint, trust=trust) if checkpoint else None
    return config_for(ck, None if ck is not None and ck.model_config else variant, {})


def official_sam(c):
    """The release's Sam with the architecture numbers `c` (a segany SamConfig; random init)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = c.img_size // c.patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=c.img_size,
            patch_size=c.patch_size,
            embed_dim=c.embed_dim,
            depth=c.depth,
            num_heads=c.num_heads,
            mlp_ratio=4.0,
            out_chans=c.prompt_embed_dim,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            global_attn_indexes=c.global_attn_indexes,
            window_size=c.window_size,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=c.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(c.img_size, c.img_size),
            mask_in_chans=c.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=c.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=c.decoder_depth,
                embedding_dim=c.prompt_embed_dim,
                mlp_dim=c.decoder_mlp_dim,
                num_heads=c.decoder_heads,
            ),
            transformer_dim=c.prompt_embed_dim,
            iou_head_depth=c.iou_head_depth,
            iou_head_hidden_dim=c.iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()


def load_photos(folder: Path, n: int, max_side) -> list:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]
    if not files:
        raise SystemExit(f"no photos in {folder}")
    out = []
    for f in files:
        im = Image.open(f).convert("RGB")
        if max_side and max(im.size) > max_side:
            s = max_side / max(im.size)
            im = im.resize((round(im.width * s), round(im.height * s)), Image.BILINEAR)
        out.append((f.name, np.asarray(im).copy()))
    return out


def _rles(records):
    return [r["segmentation"] for r in records]


def agreement(ref: list, ours: list) -> dict:
    """Records compared in order (the release's order): same count, identical RLEs, mean IoU."""
    from pycocotools import mask as mask_utils

    same = sum(a["counts"] == b["counts"] for a, b in zip(ref, ours))
    n = min(len(ref), len(ours))
    ious = [
        float(
            mask_utils.iou([mask_utils.frPyObjects(b, *b["size"])], [mask_utils.frPyObjects(a, *a["size"])], [0])[0, 0]
        )
        for a, b in zip(ref[:n], ours[:n])
    ]
    return {
        "n_ref": len(ref),
        "n_ours": len(ours),
        "identical": same,
        "mean_iou": float(np.mean(ious)) if ious else 1.0,
    }


def best_match_iou(ref: list, ours: list) -> float:
    """Mean over `ref` masks of the best IoU with any of `ours` (1.0 when both are empty)."""
    from pycocotools import mask as mask_utils

    if not ref:
        return 1.0 if not ours else 0.0
    if not ours:
        return 0.0
    a = [mask_utils.frPyObjects(r, *r["size"]) for r in ref]
    b = [mask_utils.frPyObjects(r, *r["size"]) for r in ours]
    return float(np.asarray(mask_utils.iou(a, b, [0] * len(b))).max(1).mean())


def main() -> None:
    from segany.utils.cli import add_checkpoint_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="vit_b", choices=["vit_tiny", "vit_b", "vit_l", "vit_h"])
    add_checkpoint_args(p, "release-format .pth of --variant (default: random init, seed 0)")
    p.add_argument("--photos", default=str(PHOTOS))
    p.add_argument("--images", type=int, default=2, help="first N photos (sorted by name)")
    p.add_argument("--max-side", type=int, default=None, help="downscale photos to this long side (default: as is)")
    p.add_argument("--setting", default="default", choices=["default", "sa1b", "both"])
    p.add_argument("--points-per-side", type=int, default=None, help="override the grid (both settings)")
    p.add_argument("--pred-iou-thresh", type=float, default=None, help="override (both settings)")
    p.add_argument("--stability-score-thresh", type=float, default=None, help="override (both settings)")
    p.add_argument("--runs", type=int, default=1, help="timed runs per image and implementation")
    p.add_argument("--bf16", action="store_true", help="also time segany with precision=bf16")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import segment_anything as official

    import segany
    from segany.engine.annotate import SA1B_SETTINGS
    from segany.modeling.checkpoint import torch_load

    torch.manual_seed(0)
    arch = architecture(args.variant, args.checkpoint, args.trust_checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint
        if ckpt is None:
            ckpt = os.path.join(tmp, f"{args.variant}_random.pth")
            torch.save(official_sam(arch).state_dict(), ckpt)
        ref_model = official_sam(arch)
        ref_model.load_state_dict(torch_load(ckpt, args.trust_checkpoint))
        our_model = segany.build_sam(args.variant, checkpoint=ckpt, trust_checkpoint=args.trust_checkpoint).eval()
    photos = load_photos(Path(args.photos), args.images, args.max_side)

    settings = {"default": {}, "sa1b": dict(SA1B_SETTINGS)}
    names = ["default", "sa1b"] if args.setting == "both" else [args.setting]
    impls = ["release", "segany"] + (["segany_bf16"] if args.bf16 else [])
    results = {}
    for name in names:
        kw = dict(settings[name], output_mode="uncompressed_rle")
        for key in ("points_per_side", "pred_iou_thresh", "stability_score_thresh"):
            if getattr(args, key) is not None:
                kw[key] = getattr(args, key)
        gens = {
            "release": official.SamAutomaticMaskGenerator(ref_model, **kw),
            "segany": segany.SamAutomaticMaskGenerator(our_model, **kw),
        }
        if args.bf16:
            gens["segany_bf16"] = segany.SamAutomaticMaskGenerator(our_model, **kw, precision="bf16")
        times = {i: [] for i in impls}
        agree, bf16_iou = [], []
        crashed = 0  # release runs that raised on an empty crop NMS (timed, counted as no masks)
        for fname, img in photos:
            per = {i: [] for i in impls}
            for _ in range(args.runs):
                for impl in impls:  # alternated: release, segany, segany bf16, release, ...
                    t0 = time.perf_counter()
                    with torch.inference_mode():
                        try:
                            recs = gens[impl].generate(img)
                        except IndexError:
                            # the release with crops, when no mask survives in any crop: its final crop
                            # NMS indexes an empty (0,) tensor. Every crop was processed by then, so the
                            # time counts, and its answer would have been no mask
                            if impl != "release" or len(gens[impl].point_grids) < 2:
                                raise
                            recs = []
                            crashed += 1
                    per[impl].append(time.perf_counter() - t0)
                    out = _rles(recs)
                    if impl == "release":
                        ref_out = out
                    elif impl == "segany":
                        ours_out = out
                    else:
                        bf_out = out
            for impl in impls:
                times[impl].append(statistics.median(per[impl]))
            agree.append(agreement(ref_out, ours_out))
            if args.bf16:
                bf16_iou.append(best_match_iou(ours_out, bf_out))
            print(
                f"[{name}] {fname} {img.shape[1]}x{img.shape[0]}: "
                + "  ".join(f"{i} {times[i][-1]:.1f} s" for i in impls)
                + f"  masks release/segany {agree[-1]['n_ref']}/{agree[-1]['n_ours']}"
                + f" identical {agree[-1]['identical']}",
                flush=True,
            )
        mean = {i: float(np.mean(times[i])) for i in impls}
        res = {
            "setting": kw,
            "images": [f for f, _ in photos],
            "s_per_image": {i: round(v, 2) for i, v in mean.items()},
            "images_per_hour": {i: round(3600 / v, 1) for i, v in mean.items()},
            "time_ratio": round(mean["segany"] / mean["release"], 3),
            "masks_release": sum(a["n_ref"] for a in agree),
            "masks_segany": sum(a["n_ours"] for a in agree),
            "masks_identical": sum(a["identical"] for a in agree),
            "mean_iou_vs_release": round(float(np.mean([a["mean_iou"] for a in agree])), 5),
            "release_crashed_empty": crashed,
        }
        if args.bf16:
            res["bf16_time_ratio_vs_release"] = round(mean["segany_bf16"] / mean["release"], 3)
            res["bf16_mean_best_iou_vs_fp32"] = round(float(np.mean(bf16_iou)), 4)
        results[name] = res
        print(
            f"[{name}] {args.variant}, {len(photos)} photos, {args.threads} threads: "
            f"release {mean['release']:.1f} s/image, "
            f"segany {mean['segany']:.1f} s/image (ratio {res['time_ratio']:.3f}, "
            f"{res['images_per_hour']['segany']:.0f} vs {res['images_per_hour']['release']:.0f} images/hour); "
            f"masks {res['masks_segany']} vs {res['masks_release']}, {res['masks_identical']} identical, "
            f"mean IoU {res['mean_iou_vs_release']:.4f}"
            + (f"; the release raised on an empty crop NMS in {crashed} run(s) (timed, no masks)" if crashed else "")
            + (
                f"; bf16 ratio {res['bf16_time_ratio_vs_release']:.3f}, best-match IoU vs fp32 "
                f"{res['bf16_mean_best_iou_vs_fp32']:.4f}"
                if args.bf16
                else ""
            ),
            flush=True,
        )
    print(
        json.dumps(
            {"variant": args.variant, "checkpoint": args.checkpoint, "max_side": args.max_side, "results": results}
        )
    )


if __name__ == "__main__":
    main()
