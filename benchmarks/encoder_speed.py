"""Image-encoder forward: segany (timm, fused attention) vs the release, same weights.

Timing: both encoders in one process, runs alternated (A B A B ...), median reported.
--bf16: segany's encoder is also timed under torch.autocast(bf16) (SamPredictor(precision="bf16")),
and its accuracy stated on --photos real photos: the mean IoU of the masks of SamPredictor in bf16
against fp32, 3 masks for each of 8 grid points per photo (random-init weights: the figure says
how far bf16 moves the logits' sign, not mask quality).
Peak memory: growth of the process's peak RSS during one forward of each encoder, the
high-water mark reset before each (Linux `/proc/self/clear_refs`), weights not counted.

    python benchmarks/encoder_speed.py --variant vit_b --size 1024 --runs 3
    python benchmarks/encoder_speed.py --variant vit_b --runs 1 --bf16 --photos 2
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's segany

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos"


def build(impl: str, variant: str, ckpt: str):
    if impl == "official":
        from segment_anything import sam_model_registry

        return sam_model_registry[variant](checkpoint=ckpt).image_encoder.eval()
    import segany

    return segany.build_sam(variant, checkpoint=ckpt).image_encoder.eval()


def bf16_mask_iou(model, n_photos: int) -> float:
    """Mean IoU of SamPredictor's masks in bf16 vs fp32 on the first n photos (8 grid points x 3 masks)."""
    from PIL import Image

    from segany.inference import SamPredictor
    from segany.inference.amg_utils import build_point_grid

    ious = []
    for f in sorted(PHOTOS.glob("*.jpg"))[:n_photos]:
        image = np.asarray(Image.open(f).convert("RGB"))
        h, w = image.shape[:2]
        points = build_point_grid(3)[:8] * [w, h]  # (8, 2) xy px
        masks = {}
        for precision in ("fp32", "bf16"):
            pred = SamPredictor(model, precision=precision)
            pred.set_image(image)
            masks[precision] = [pred.predict(point_coords=p[None], point_labels=np.array([1]))[0] for p in points]
        for a, b in zip(masks["fp32"], masks["bf16"]):
            union = (a | b).sum((1, 2))
            ious += list(np.where(union > 0, (a & b).sum((1, 2)) / np.maximum(union, 1), 1.0))
    return float(np.mean(ious))


def _bf16(encoder, x):
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        return encoder(x)


def _vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024


def peak_memory(enc, x) -> float:
    """MiB of peak RSS growth during one forward: reset the kernel's high-water mark
    (`clear_refs` 5, Linux), run, read VmHWM back."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _vm_hwm_mib()
    with torch.inference_mode():
        enc(x)
    return _vm_hwm_mib() - before


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--bf16", action="store_true", help="also time segany under autocast(bf16) and state its mask IoU")
    p.add_argument("--photos", type=int, default=2, help="with --bf16: real photos for the mask IoU")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    with tempfile.NamedTemporaryFile(suffix=".pth") as f:
        torch.save(sam_model_registry[args.variant]().state_dict(), f.name)
        encoders = {impl: build(impl, args.variant, f.name) for impl in ("official", "segany")}
        if args.bf16:
            seg = encoders["segany"]
            encoders["segany_bf16"] = lambda x: _bf16(seg, x)
        if args.size != 1024:
            raise SystemExit("the release's encoder only runs at its native 1024 px")
        x = torch.randn(1, 3, args.size, args.size)
        times = {impl: [] for impl in encoders}
        with torch.inference_mode():
            ref = encoders["official"](x)
            diff = (encoders["segany"](x) - ref).abs().max().item()
            for _ in range(args.runs):
                for impl, enc in encoders.items():
                    t0 = time.perf_counter()
                    enc(x)
                    times[impl].append(time.perf_counter() - t0)
        mem = {impl: peak_memory(enc, x) for impl, enc in encoders.items() if impl != "segany_bf16"}
        if args.bf16:
            import segany

            miou = bf16_mask_iou(segany.build_sam(args.variant, checkpoint=f.name).eval(), args.photos)
    med = {impl: statistics.median(t) for impl, t in times.items()}
    result = {
        "variant": args.variant,
        "size": args.size,
        "threads": args.threads,
        "runs": args.runs,
        "official_s": round(med["official"], 3),
        "segany_s": round(med["segany"], 3),
        "time_ratio": round(med["segany"] / med["official"], 3),
        "official_peak_mib": round(mem["official"], 1),
        "segany_peak_mib": round(mem["segany"], 1),
        "max_abs_diff": diff,
    }
    if args.bf16:
        result["segany_bf16_s"] = round(med["segany_bf16"], 3)
        result["bf16_time_ratio_vs_official_fp32"] = round(med["segany_bf16"] / med["official"], 3)
        result["bf16_mask_iou_vs_fp32"] = round(miou, 4)
    print(f"{args.variant} encoder forward @ {args.size}px, fp32 CPU, {args.threads} threads, median of {args.runs}")
    print(f"  official {med['official']:.3f} s   segany {med['segany']:.3f} s   ratio {result['time_ratio']:.3f}")
    print(f"  peak memory over weights: official {mem['official']:.0f} MiB   segany {mem['segany']:.0f} MiB")
    print(f"  max |difference| of the embeddings: {diff:.2e}")
    if args.bf16:
        print(
            f"  segany bf16 (autocast) {med['segany_bf16']:.3f} s = "
            f"{result['bf16_time_ratio_vs_official_fp32']:.3f}x the official fp32; "
            f"masks vs fp32 on {args.photos} photos: mean IoU {miou:.4f}"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
