"""torch.compile against the hand-written fused focal + dice pass that segany/training/losses.py had.

Three versions of SAM's mask terms (focal, dice and the IoU counts of every candidate), each
timed forward + backward of 20 * focal + dice:

    plain     losses.mask_terms: plain torch ops, autograd's backward
    compiled  the same function under torch.compile (inductor): SamLoss(compile=True)
    fused     the hand-written pass it replaced (one chunked pass, closed-form backward), kept
              below as the baseline

and the mask decoder round (``predict_masks`` forward + backward) eager against compiled.
The versions alternate in one process, ``--rounds`` rounds of ``--calls`` calls each; the
figure is the median ms per call over the rounds, and its ratio to the fused pass.

    OMP_NUM_THREADS=1 python benchmarks/loss_compile.py                    # demo and GPU-scale shapes, decoder
    OMP_NUM_THREADS=2 python benchmarks/loss_compile.py --rounds 5 --no-decoder
    python benchmarks/loss_compile.py --shapes 24x3x192 --rounds 3 --calls 2
    OMP_NUM_THREADS=2 python benchmarks/loss_compile.py --shapes          # only the decoder round
    python benchmarks/loss_compile.py --device cuda --shapes 64x3x256 64x3x1024 --calls 10

Shapes are rows x candidates x side: the demo's (configs/experiment/demo.yaml: 8 images x <= 3
masks, multimask round 0 and single-mask rounds after it, loss at the 192 px input) and a
GPU-scale 64 masks x 3 x 256. The CPU inductor backend needs a C++ compiler (g++).

Measured (AMD EPYC, 1 and 2 threads): the figures in the docstring of losses.mask_terms. The
decoder round, 24 rows: eager 107 ms, compiled 119 ms (1 thread; 0.8-1.1x over four runs) and
556 vs 541 ms (2 threads, 0.97x), so the decoder stays eager.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler (memory figures) quiet
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's segany
import segany  # noqa: E402
from segany.training.losses import mask_terms  # noqa: E402  (plain torch ops)

ROOT = Path(__file__).resolve().parents[1]


# ---- the hand-written fused pass that losses.mask_terms replaced (the figure's baseline), as it was
CHUNK = 1 << 21  # elements of (rows, K, H*W) per chunk of the fused mask terms: its temporaries stay in cache


class _MaskTerms(torch.autograd.Function):
    """Focal and dice of every candidate mask, and the counts of its IoU, in one fused pass.

    Hand-written rather than torchvision's ``sigmoid_focal_loss`` + a dice on ``sigmoid``: at the
    full-resolution loss (S = 1024, 3 candidates per mask) those are ~30 separate passes over
    (R, 3, S, S) tensors, each saved for backward, and the step's largest non-matmul cost. Here,
    for binary targets, with y = x (t = 0) or -x (t = 1) and q = sigmoid(y) (= 1 - p_t):
    focal = a_t q^gamma softplus(y), p = t + (1 - 2t) q, and every pixel sum is a product
    with per-row pixel weights; backward is the closed form of the same terms,
    recomputed chunk by chunk from the logits (nothing else is saved).

    x (R, K, P) logits, w (R, 4, P) per-pixel weights [a_t * in, (1 - 2t) * in, t * in, in]
    (in = the pixels that count), n_in, n_t, n_t_all (R,) the sums of in, t * in and t, gamma,
    smooth -> focal (R, K) mean over the pixels in, dice (R, K), inter (R, K), union (R, K) of
    (x > 0) inside with t (counts, no gradient). As before this fusion, |t| in dice and the
    union counts the whole target (it is zero outside the image content anyway).
    """

    @staticmethod
    def forward(ctx, x, w, n_in, n_t, n_t_all, gamma, smooth):
        R, K, P = x.shape
        sums = x.new_empty(5, R, K)  # sum a_t f, sum sgn q, sum t q, sum pred t, sum pred (inside)
        for r0, r1 in _chunks(R, K * P):
            xc, wc = x[r0:r1], w[r0:r1, :, None]  # (r, K, P), (r, 4, 1, P)
            y = xc * wc[:, 1].sign()  # (r, K, P) x or -x inside, 0 outside (weights 0 there)
            q = torch.sigmoid(y)
            f = torch.nn.functional.softplus(y).mul_(q.pow(gamma) if gamma != 2 else q.square())
            pos = (xc > 0).to(x.dtype)
            for i, (v, j) in enumerate(((f, 0), (q, 1), (q, 2), (pos, 2), (pos, 3))):
                # products then sum (cascade summation; a bmm over 1M pixels would lose ~1e-4)
                torch.sum(v * wc[:, j], dim=-1, out=sums[i, r0:r1])
        focal, qs0, qs1, inter, pin = sums
        n, nt, nt_all = n_in[:, None], n_t[:, None], n_t_all[:, None]  # (R, 1)
        psum = nt + qs0  # sum p
        inter_p = nt - qs1  # sum p * t
        num, den = 2 * inter_p + smooth, psum + nt_all + smooth
        union = pin + nt_all - inter
        ctx.save_for_backward(x, w, n_in, num, den)
        ctx.gamma = gamma
        ctx.mark_non_differentiable(inter, union)
        return focal / n.clamp(min=1), 1 - num / den, inter, union

    @staticmethod
    def backward(ctx, g_focal, g_dice, _gi, _gu):
        x, w, n_in, num, den = ctx.saved_tensors
        gamma = ctx.gamma
        R, K, P = x.shape
        gf = (g_focal / n_in[:, None].clamp(min=1))[..., None]  # (R, K, 1)
        c1 = (g_dice * num / den.square())[..., None]  # d dice / d p = in * (num / den^2 - 2 t / den)
        c2 = (-2 * g_dice / den)[..., None]
        grad = torch.empty_like(x)
        for r0, r1 in _chunks(R, K * P):
            xc, wc = x[r0:r1], w[r0:r1, :, None]  # (r, K, P), (r, 4, 1, P)
            sgn = wc[:, 1].sign()  # (r, 1, P) 1 - 2t inside, 0 outside
            y = xc * sgn
            q = torch.sigmoid(y)
            u = q * (1 - q)  # dp/dx = dq/dy
            # d focal / dx = sgn a_t q^gamma (gamma (1 - q) softplus(y) + q)
            d = torch.nn.functional.softplus(y).mul_(1 - q).mul_(gamma).add_(q)
            d.mul_(q.pow(gamma) if gamma != 2 else q.square()).mul_(gf[r0:r1]).mul_(wc[:, 0] * sgn)
            # dice: u * in * (c1 + c2 t)
            d.addcmul_(u, torch.addcmul(c1[r0:r1] * wc[:, 3], c2[r0:r1], wc[:, 2]))
            grad[r0:r1] = d
        return grad, None, None, None, None, None, None


def _chunks(rows: int, per_row: int):
    step = max(1, CHUNK // max(per_row, 1))
    return ((r0, min(r0 + step, rows)) for r0 in range(0, rows, step))


def fused_mask_terms(
    logits: Tensor,
    targets: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    smooth: float = 1.0,
    inside: Optional[Tensor] = None,
) -> dict:
    """(R, K, H, W) logits, binary targets (R, 1 | K, H, W) (bool or 0/1 float), inside (R, 1, H, W)
    bool (None: every pixel) -> dict of (R, K): ``focal`` (sigmoid focal loss, alpha / gamma as
    torchvision's, mean over the inside pixels; alpha < 0: no weighting), ``dice`` (1 - (2|pt| + s)
    / (|p| + |t| + s) on the inside pixels) and ``inter`` / ``union`` pixel counts of (logits > 0)
    with the target inside (the IoU; no gradient). One fused pass (``_MaskTerms``)."""
    R, K, H, W = logits.shape
    t = targets.reshape(targets.shape[0], targets.shape[1], H * W)
    if t.shape[1] != 1:  # one target per candidate: rows of candidates
        out = fused_mask_terms(
            logits.reshape(R * K, 1, H, W),
            targets.reshape(R * K, 1, H, W),
            alpha,
            gamma,
            smooth,
            None if inside is None else inside.expand(R, K, H, W).reshape(R * K, 1, H, W),
        )
        return {k: v.view(R, K) for k, v in out.items()}
    x = logits.float().reshape(R, K, H * W)
    t = t[:, 0].to(x.dtype) > 0.5
    tf = t.to(x.dtype)  # (R, P)
    ins = torch.ones_like(tf) if inside is None else inside.reshape(R, H * W).to(x.dtype)
    a_t = torch.ones_like(tf) if alpha < 0 else (1 - alpha) + (2 * alpha - 1) * tf
    w = torch.stack((a_t * ins, (1 - 2 * tf) * ins, tf * ins, ins), dim=1)  # (R, 4, P)
    n_in, n_t, n_t_all = ins.sum(1), (tf * ins).sum(1), tf.sum(1)  # (R,)
    focal, dice, inter, union = _MaskTerms.apply(x, w, n_in, n_t, n_t_all, float(gamma), float(smooth))
    return {"focal": focal, "dice": dice, "inter": inter, "union": union}


DEVICE = torch.device("cpu")  # main(): --device


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, calls: int) -> float:
    """ms per call of fn() over `calls` calls."""
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - t0) * 1e3 / calls


def alternate(variants: dict, rounds: int, calls: int) -> dict:
    """name -> list of ms per call, one per round; the variants take turns within each round."""
    for fn in variants.values():  # warm-up (compilation happens here)
        fn()
    out = {k: [] for k in variants}
    for _ in range(rounds):
        for k, fn in variants.items():
            out[k].append(timed(fn, calls))
    return out


def kept_mb(forward) -> float:
    """MB allocated by forward() and still held when it returns (the profiler's memory events;
    on CUDA the allocator's count): what autograd keeps for backward (plus the small outputs),
    beyond the inputs."""
    from torch.profiler import ProfilerActivity, profile

    if DEVICE.type == "cuda":
        sync()
        before = torch.cuda.memory_allocated()
        out = forward()
        sync()
        kept = torch.cuda.memory_allocated() - before
        del out
        return kept / 2**20

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = forward()
    del out
    return sum(e.cpu_memory_usage for e in prof.events() if e.cpu_parent is None) / 2**20


def report(title: str, ms: dict, mb: dict, base: str) -> None:
    med = {k: statistics.median(v) for k, v in ms.items()}
    print(f"\n{title}")
    print(f"| version | median ms/call | x {base} | kept for backward (MB) | rounds (ms) |")
    print("|---|---|---|---|---|")
    for k, m in med.items():
        print(f"| {k} | {m:.1f} | {m / med[base]:.2f} | {mb[k]:.0f} | {' '.join(f'{v:.1f}' for v in ms[k])} |")


def loss_bench(R: int, K: int, S: int, rounds: int, calls: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(R, K, S, S, generator=g) * 3).to(DEVICE).requires_grad_(True)
    t = (torch.rand(R, 1, S, S, generator=g) > 0.7).to(DEVICE)
    compiled_fn = torch.compile(mask_terms, dynamic=False)

    def step(fn):
        def run():
            x.grad = None
            m = fn(x, t)
            (20 * m["focal"] + m["dice"]).sum().backward()

        return run

    # the three agree before they are timed; the compiled version's first call compiles it
    result, compile_s = {}, 0.0
    for name, fn in (("plain", mask_terms), ("compiled", compiled_fn), ("fused", fused_mask_terms)):
        t0 = time.perf_counter()
        x.grad = None
        m = fn(x, t)
        (20 * m["focal"] + m["dice"]).sum().backward()
        result[name] = (m, x.grad.clone())
        sync()
        compile_s = time.perf_counter() - t0 if name == "compiled" else compile_s
    for name in ("plain", "compiled"):
        for key in ("focal", "dice", "inter", "union"):
            torch.testing.assert_close(result[name][0][key], result["fused"][0][key], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(result[name][1], result["fused"][1], rtol=1e-3, atol=1e-8)
    variants = {"plain": step(mask_terms), "compiled": step(compiled_fn), "fused": step(fused_mask_terms)}
    mb = {k: kept_mb(lambda: fn(x, t)) for k, fn in (("plain", mask_terms), ("compiled", compiled_fn))}
    mb["fused"] = kept_mb(lambda: fused_mask_terms(x, t))
    ms = alternate(variants, rounds, calls)
    title = f"focal + dice forward + backward, logits {R} x {K} x {S} x {S} (first compiled call {compile_s:.1f} s)"
    report(title, ms, mb, "fused")


def decoder_bench(rounds: int, calls: int, rows: int, tokens: int) -> None:
    from omegaconf import OmegaConf

    arch = OmegaConf.to_container(OmegaConf.load(ROOT / "configs/experiment/demo.yaml").model)
    model = segany.build_sam("vit_tiny", **arch).to(DEVICE)
    dec = model.mask_decoder
    C, h = arch["prompt_embed_dim"], arch["img_size"] // 16
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(rows, C, h, h, generator=g).to(DEVICE)
    pe = model.prompt_encoder.get_dense_pe()
    sparse = torch.randn(rows, tokens, C, generator=g).to(DEVICE)
    dense = torch.randn(rows, C, h, h, generator=g).to(DEVICE)

    def step(fn):
        def run():
            dec.zero_grad(set_to_none=True)
            masks, iou = fn(emb, pe, sparse, dense)
            (masks.float().square().mean() + iou.float().sum()).backward()

        return run

    t0 = time.perf_counter()
    compiled = torch.compile(dec.predict_masks, dynamic=False)
    step(compiled)()
    sync()
    compile_s = time.perf_counter() - t0
    variants = {"eager": step(dec.predict_masks), "compiled": step(compiled)}
    fwd = {"eager": dec.predict_masks, "compiled": compiled}
    mb = {k: kept_mb(lambda: fn(emb, pe, sparse, dense)) for k, fn in fwd.items()}
    ms = alternate(variants, rounds, calls)
    report(
        f"mask decoder round forward + backward, {rows} rows x {tokens} prompt tokens, demo architecture "
        f"({C} wide, {h} x {h} embedding; first compiled call {compile_s:.1f} s)",
        ms,
        mb,
        "eager",
    )


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shapes = ["24x3x192", "24x1x192", "64x3x256"]
    ap.add_argument("--shapes", nargs="*", default=shapes, help="rows x K x side (none: only the decoder)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=3, help="calls per round and version")
    ap.add_argument("--no-decoder", action="store_true")
    ap.add_argument("--decoder-rows", type=int, default=24, help="demo: 8 images x <= 3 masks")
    ap.add_argument("--decoder-tokens", type=int, default=6, help="sparse prompt tokens (clicks + padding)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    print("command: " + " ".join([f"OMP_NUM_THREADS={torch.get_num_threads()}", "python", *sys.argv]))
    where = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"hardware: {cpu_name()}, {where}; torch {torch.__version__}")
    for shape in args.shapes:
        R, K, S = (int(v) for v in shape.split("x"))
        loss_bench(R, K, S, args.rounds, args.calls)
    if not args.no_decoder:
        decoder_bench(args.rounds, args.calls, args.decoder_rows, args.decoder_tokens)


if __name__ == "__main__":
    main()
