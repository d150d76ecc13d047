"""One SAM training step, split: image encoder forward / backward and the decoder rounds
(forward / backward), with the simulation's own overhead (point sampling, mask selection,
bookkeeping) measured apart from the decoder and the loss; plus the decoder's activation
memory per mask per round with and without per-round recomputation, projected to ViT-H at
1024 px on an 80 GB GPU.

    python benchmarks/train_step.py                          # vit_tiny and vit_b, 1024 px, 64 masks, 11 rounds
    python benchmarks/train_step.py --models vit_b --masks 16 --rounds 3
    python benchmarks/train_step.py --models vit_tiny --masks 16 --resolutions full low   # the cost of S vs S/4 targets
    python benchmarks/train_step.py --models vit_tiny --img-size 256 --masks 24 --rounds 2 --alternate 5 --no-timing

Timing runs on CUDA when available, else on the CPU (2 threads here). The decoder rounds
are timed with per-round recomputation on (``checkpoint_rounds``): without it 64 x 11
rounds of activations exceed this machine's memory (see the projection). Memory figures
are counted from the tensors autograd saves for backward (saved-tensor hooks), on the
meta device: exact shapes and dtypes, no compute, so ViT-H is counted directly.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.fx.experimental._config  # noqa: F401  (meta_nonzero_assume_all_nonzero, see memory())
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's segany
import segany  # noqa: E402
from segany.testing.toy import toy_batch  # noqa: E402
from segany.training import simulation as sim  # noqa: E402
from segany.training.losses import SamLoss  # noqa: E402
from segany.training.prompting import PromptConfig  # noqa: E402

GB = 1024**3


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Timers:
    """Accumulated wall time of wrapped callables (synchronised on CUDA)."""

    def __init__(self, device):
        self.device, self.t = device, {}

    def wrap(self, name, fn):
        def timed(*a, **k):
            sync(self.device)
            t0 = time.perf_counter()
            out = fn(*a, **k)
            sync(self.device)
            self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - t0
            return out

        return timed


@contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def prompt_cfg(rounds: int, **kw) -> PromptConfig:
    """``rounds`` predictions: 1 initial + point rounds + up to 2 mask rounds, as the default 11."""
    mask_rounds = min(2, max(0, rounds - 2))
    return PromptConfig(point_rounds=rounds - 1 - mask_rounds, mask_rounds=mask_rounds, **kw)


PHASES = ("encoder_fwd", "rounds_fwd", "rounds_bwd", "encoder_bwd")


def matmul_peak(device, dtype: torch.dtype, n_max: int = 2048, reps: int = 3) -> tuple[float, int]:
    """Measured FLOP/s of an n^3 matmul in ``dtype`` (best of ``reps`` after a warm-up) -> (FLOP/s, n):
    the peak the step's phases are compared with, taken in the same run as they are. n doubles
    from 256 to ``n_max`` while one product takes under 0.5 s: a CPU without bf16 matrix units
    (AVX2 only) runs bf16 products ~60x slower than fp32, and a 2048^3 one would take minutes."""
    n = 256
    while True:
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        best = float("inf")
        for i in range(reps + 1):
            sync(device)
            t0 = time.perf_counter()
            a @ b
            sync(device)
            dt = time.perf_counter() - t0
            if i or dt > 0.5:  # the warm-up counts when it is already slow
                best = min(best, dt)
            if dt > 0.5:
                break
        if n >= n_max or best > 0.5:
            return 2 * n**3 / best, n
        n *= 2


def time_step(
    variant: str,
    img_size: int,
    masks: int,
    rounds: int,
    device,
    warmup: bool = True,
    resolution: str = "full",
    precision: str = "fp32",
) -> dict:
    """One training step's phases: seconds (a timed step), and FLOPs (``flops_*``, a second step
    run under ``FlopCounterMode``: the same shapes; the backward of the rounds counts their
    recomputed forward). precision "bf16" = ``torch.autocast(bfloat16)`` on the device, as
    ``precision=bf16`` in training; "fp32" = no autocast."""
    torch.manual_seed(0)
    model = segany.build_sam(variant, img_size=img_size).to(device)
    batch = toy_batch(1, masks, img_size, device=device)
    cfg = prompt_cfg(rounds, checkpoint_rounds=True, resolution=resolution)
    loss_fn = SamLoss()
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(flops=None):
        """flops: None (time the phases) or a dict to fill with the FLOPs of each phase."""
        counted = {}

        def phase(name):
            if flops is None:
                return nullcontext()
            counted[name] = FlopCounterMode(display=False)
            return counted[name]

        tm = Timers(device)
        # decoder = prompt encoder + mask decoder; loss = SamLoss; the rest of simulate = overhead
        timed_loss = tm.wrap("loss", loss_fn)
        with (
            patched(model.prompt_encoder, "forward", tm.wrap("decoder", model.prompt_encoder.forward)),
            patched(model.mask_decoder, "predict_masks", tm.wrap("decoder", model.mask_decoder.predict_masks)),
        ):
            with amp:
                sync(device)
                t0 = time.perf_counter()
                with phase("encoder_fwd"):
                    emb = model.image_encoder(batch["image"])
                sync(device)
                t1 = time.perf_counter()
                leaf = emb.detach().requires_grad_(True)
                with phase("rounds_fwd"):
                    out = sim.simulate(model, leaf, batch, cfg, timed_loss)
                sync(device)
                t2 = time.perf_counter()
                dec, loss = tm.t.get("decoder", 0.0), tm.t.get("loss", 0.0)  # forward only
            with phase("rounds_bwd"):
                out["loss"].backward()  # decoder rounds backward (recomputes each round)
            sync(device)
            t3 = time.perf_counter()
            with phase("encoder_bwd"):
                emb.backward(leaf.grad)  # encoder backward
            sync(device)
            t4 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        if flops is not None:
            flops.update({name: c.get_total_flops() for name, c in counted.items()})
        return {
            "encoder_fwd": t1 - t0,
            "rounds_fwd": t2 - t1,
            "rounds_bwd": t3 - t2,
            "encoder_bwd": t4 - t3,
            "decoder_fwd": dec,
            "loss_fwd": loss,
            "overhead_fwd": (t2 - t1) - dec - loss,
        }

    if warmup:  # first calls pay allocator / kernel setup; time the second step
        small = prompt_cfg(2, checkpoint_rounds=True, resolution=resolution)
        with patched(cfg, "point_rounds", small.point_rounds), patched(cfg, "mask_rounds", small.mask_rounds):
            step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    res = step()
    if device.type == "cuda":
        res["peak_gb"] = torch.cuda.max_memory_allocated() / GB
    flops = {}
    step(flops)
    res.update({f"flops_{k}": v for k, v in flops.items()})
    return res


def alternate(variant: str, img_size: int, masks: int, rounds: int, device, repeats: int) -> dict:
    """The decoder rounds (forward + backward, encoder excluded: it is the same) of one batch with
    ``prompting.resolution`` full and low, alternating in this process, ``repeats`` times each
    after one warm-up each -> {resolution: [seconds...]}."""
    torch.manual_seed(0)
    model = segany.build_sam(variant, img_size=img_size).to(device)
    batch = toy_batch(1, masks, img_size, device=device)
    with torch.no_grad():
        emb = model.image_encoder(batch["image"])
    times = {"full": [], "low": []}
    for rep in range(repeats + 1):
        for res in times:
            cfg = prompt_cfg(rounds, resolution=res)
            leaf = emb.clone().requires_grad_(True)
            sync(device)
            t0 = time.perf_counter()
            sim.simulate(model, leaf, batch, cfg, SamLoss(), torch.Generator(device).manual_seed(rep))[
                "loss"
            ].backward()
            sync(device)
            if rep:
                times[res].append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
    return times


def saved_bytes(fn, model) -> int:
    """Bytes of the storages autograd saves for backward while running fn, each storage
    once, the model's parameters excluded (they are not activations)."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen = set()

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in params:
            seen.add((st._cdata, st.nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(n for _, n in seen)


def memory(variant: str, img_size: int, masks: int, rounds: int, dtype=torch.float32, resolution="full") -> dict:
    """Activation bytes on the meta device: encoder per image, decoder per mask per round
    (stored without recomputation), the fed-back logits kept per mask per round with it."""
    dev = torch.device("meta")
    with torch.device(dev):
        model = segany.build_sam(variant, img_size=img_size).to(dtype)
    S, h = img_size, img_size // 16
    R = masks
    batch = {
        "image": torch.empty(1, 3, S, S, device=dev, dtype=dtype),
        "masks": torch.empty(1, R, S, S, device=dev, dtype=torch.bool),
        "masks_lowres": torch.empty(1, R, S // 4, S // 4, device=dev, dtype=torch.bool),
        "valid": torch.ones(1, R, device=dev, dtype=torch.bool),
        "boxes": torch.empty(1, R, 4, device=dev, dtype=dtype),
        "input_size": torch.tensor([[S, S]], device=dev),
    }
    enc = saved_bytes(lambda: model.image_encoder(batch["image"]), model)
    emb = torch.empty(1, 256, h, h, device=dev, dtype=dtype, requires_grad=True)
    cfg = prompt_cfg(rounds, resolution=resolution)
    # simulate() selects the valid rows with nonzero(), which the meta device cannot size; every
    # row is valid here, the case this setting assumes
    with patched(torch.fx.experimental._config, "meta_nonzero_assume_all_nonzero", True):
        dec = saved_bytes(lambda: sim.simulate(model, emb, batch, cfg, SamLoss()), model)
    per = dec / (R * cfg.num_rounds)
    kept = (S // 4) ** 2 * torch.empty((), dtype=dtype).element_size()  # fed-back logits (R,1,S/4,S/4)
    params = sum(p.numel() for p in model.parameters())
    return {"encoder_act": enc, "per_mask_round": per, "kept_per_mask_round": kept, "params": params}


def projection(masks: int, rounds: int, per_round: float, kept: float, enc_act: float, params: int, chunk: int) -> dict:
    states = params * (4 + 4 + 8)  # fp32 weights, grads, AdamW moments
    no_rc = states + enc_act + masks * rounds * per_round
    rc = states + enc_act + masks * rounds * kept + chunk * per_round
    return {"states": states, "no_recompute": no_rc, "recompute": rc}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["vit_tiny", "vit_b"])
    ap.add_argument("--img-size", type=int, default=1024)
    ap.add_argument("--masks", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--no-timing", action="store_true", help="memory figures only")
    ap.add_argument("--no-memory", action="store_true", help="timing figures only")
    ap.add_argument(
        "--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"], help="autocast off / bf16 autocast"
    )
    ap.add_argument(
        "--resolutions", nargs="+", default=["full"], choices=["full", "low"], help="prompting.resolution(s) to measure"
    )
    ap.add_argument(
        "--alternate",
        type=int,
        default=0,
        metavar="N",
        help="time the rounds at full and low resolution, alternating N times",
    )
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"device {device} ({torch.get_num_threads()} threads), {args.img_size} px, {args.masks} masks, "
        f"{args.rounds} rounds"
    )
    for v in args.models if args.alternate else ():
        t = alternate(v, args.img_size, args.masks, args.rounds, device, args.alternate)
        med = {r: sorted(x)[len(x) // 2] for r, x in t.items()}
        print(
            f"[{v}] decoder rounds fwd+bwd, median of {args.alternate} alternating: full {med['full']:.3f} s, "
            f"low {med['low']:.3f} s, full / low = {med['full'] / med['low']:.2f}x"
        )
        print(f"  full: {', '.join(f'{x:.3f}' for x in t['full'])}\n  low:  {', '.join(f'{x:.3f}' for x in t['low'])}")
    for res in args.resolutions:
        print(f"\n=== prompting.resolution={res} ===")
        report(args, device, res)


def report_step(args, device, res: str, v: str, prec: str):
    """Time and FLOPs of each phase of one step; FLOP/s against the matmul peak of ``prec``."""
    dtype = torch.bfloat16 if prec == "bf16" else torch.float32
    peak, n = matmul_peak(device, dtype)
    r = time_step(v, args.img_size, args.masks, args.rounds, device, resolution=res, precision=prec)
    # again after the step, the higher of the two: on a shared machine one reading can be low
    peak = max(peak, matmul_peak(device, dtype)[0])
    total = sum(r[k] for k in PHASES)
    flops = sum(r[f"flops_{k}"] for k in PHASES)
    print(f"\n[{v}, {prec}] one step: {total:.1f} s, {flops / 1e12:.2f} TFLOP counted")
    print(f"  {prec} matmul peak ({n}^3, measured now, best of before / after): {peak / 1e9:.1f} GFLOP/s")
    for k in PHASES:
        t, f = r[k], r[f"flops_{k}"]
        note = " (recomputes the forward)" if k == "rounds_bwd" else ""
        print(
            f"  {k:<12} {t:7.2f} s {f / 1e9:9.1f} GFLOP {f / t / 1e9:7.1f} GFLOP/s "
            f"{100 * f / t / peak:5.1f}% of peak{note}"
        )
    print(
        f"  total        {total:7.2f} s {flops / 1e9:9.1f} GFLOP {flops / total / 1e9:7.1f} GFLOP/s "
        f"{100 * flops / total / peak:5.1f}% of peak"
    )
    print(
        f"  in rounds fwd: decoder {r['decoder_fwd']:.2f} s, loss {r['loss_fwd']:.2f} s, "
        f"simulation overhead {r['overhead_fwd']:.2f} s = "
        f"{100 * r['overhead_fwd'] / r['decoder_fwd']:.1f}% of the decoder"
    )
    if "peak_gb" in r:
        print(f"  peak memory {r['peak_gb']:.2f} GB")


def report(args, device, res: str):
    if not args.no_timing:
        for v in args.models:
            for prec in args.precision:
                report_step(args, device, res, v, prec)
    if args.no_memory:
        return
    print("\nactivation memory (fp32, counted on the meta device):")
    mem = {}
    for v in dict.fromkeys(list(args.models) + ["vit_h"]):
        mem[v] = memory(v, args.img_size, args.masks, args.rounds, resolution=res)
        m = mem[v]
        print(
            f"  [{v}] encoder {m['encoder_act'] / GB:.2f} GB/image; decoder per mask per round: "
            f"{m['per_mask_round'] / 2**20:.1f} MiB stored without recompute, "
            f"{m['kept_per_mask_round'] / 2**20:.2f} MiB with (+ one round's {m['per_mask_round'] / 2**20:.1f} MiB "
            f"x chunk transient)"
        )
    h = mem["vit_h"]
    print(
        f"\nprojection, ViT-H at {args.img_size} px, 1 image/GPU, {args.masks} masks x {args.rounds} rounds, "
        f"fp32 activations (bf16 autocast roughly halves them):"
    )
    for i, chunk in enumerate((args.masks, 16)):
        p = projection(
            args.masks, args.rounds, h["per_mask_round"], h["kept_per_mask_round"], h["encoder_act"], h["params"], chunk
        )
        if i == 0:
            print(
                f"  weights+grads+AdamW {p['states'] / GB:.1f} GB, encoder activations {h['encoder_act'] / GB:.1f} GB"
            )
            print(
                f"  decoder without recompute: total {p['no_recompute'] / GB:.1f} GB "
                f"({'fits' if p['no_recompute'] < 80 * GB else 'does NOT fit'} 80 GB)"
            )
        print(
            f"  decoder with per-round recompute, mask_chunk={chunk}: total {p['recompute'] / GB:.1f} GB "
            f"({'fits' if p['recompute'] < 80 * GB else 'does NOT fit'} 80 GB)"
        )


if __name__ == "__main__":
    main()
