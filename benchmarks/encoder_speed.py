"""Image-encoder forward: segany (timm, fused attention) vs the release, same weights.

Timing: both encoders in one process, runs alternated (A B A B ...), median reported.
Peak memory: growth of the process's peak RSS during one forward of each encoder, the
high-water mark reset before each (Linux `/proc/self/clear_refs`), weights not counted.

    python benchmarks/encoder_speed.py --variant vit_b --size 1024 --runs 3
"""

import argparse
import json
import statistics
import tempfile
import time

import torch


def build(impl: str, variant: str, ckpt: str):
    if impl == "official":
        from segment_anything import sam_model_registry

        return sam_model_registry[variant](checkpoint=ckpt).image_encoder.eval()
    import segany

    return segany.build_sam(variant, checkpoint=ckpt).image_encoder.eval()


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
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    with tempfile.NamedTemporaryFile(suffix=".pth") as f:
        torch.save(sam_model_registry[args.variant]().state_dict(), f.name)
        encoders = {impl: build(impl, args.variant, f.name) for impl in ("official", "segany")}
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
        mem = {impl: peak_memory(enc, x) for impl, enc in encoders.items()}
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
    print(f"{args.variant} encoder forward @ {args.size}px, fp32 CPU, {args.threads} threads, median of {args.runs}")
    print(f"  official {med['official']:.3f} s   segany {med['segany']:.3f} s   ratio {result['time_ratio']:.3f}")
    print(f"  peak memory over weights: official {mem['official']:.0f} MiB   segany {mem['segany']:.0f} MiB")
    print(f"  max |difference| of the embeddings: {diff:.2e}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
