"""Frozen-encoder fine-tuning steps/s: embeddings from the cache vs the encoder recomputed every step.

    python benchmarks/embedding_cache.py                                   # vit_b, 1024 px, 64 masks, 11 rounds
    python benchmarks/embedding_cache.py --masks 4 --rounds 3 --steps 3    # the CPU figure in experiments/speed.md

Two SamModules with the same weights, ``freeze_image_encoder=True``, one with
``embedding_cache`` on (bf16 entries in a temporary folder, filled by an untimed first step),
alternate step by step in one process on the same batch and prompts: module.embed -> the
interactive simulation -> backward -> AdamW step on prompt encoder + decoder. Reported: median
seconds per step and steps/s of each, and their ratio. Not included: the data loader (its
workers decode the image either way). Runs on CUDA when available, else the CPU.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import segany  # noqa: E402
from segany.testing.toy import toy_batch  # noqa: E402
from segany.training import EmbeddingCache, PromptConfig, SamLoss, SamModule, simulate  # noqa: E402


def prompt_cfg(rounds: int, checkpoint_rounds: bool) -> PromptConfig:
    """``rounds`` predictions: 1 initial + point rounds + up to 2 mask rounds, as the default 11;
    targets at full resolution (configs/prompting/sam.yaml)."""
    mask_rounds = min(2, max(0, rounds - 2))
    return PromptConfig(
        point_rounds=rounds - 1 - mask_rounds, mask_rounds=mask_rounds, checkpoint_rounds=checkpoint_rounds
    )


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(module: SamModule, opt, batch: dict, cfg: PromptConfig, seed: int, device) -> float:
    """One decoder-only training step; its wall time in seconds."""
    sync(device)
    t0 = time.perf_counter()
    emb = module.embed(batch["image"], batch["image_id"])
    torch.manual_seed(seed)  # the same prompts for both implementations
    out = simulate(module.model, emb, batch, cfg, SamLoss())
    out["loss"].backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vit_b")
    ap.add_argument("--img-size", type=int, default=1024)
    ap.add_argument("--images", type=int, default=1, help="images per step")
    ap.add_argument("--masks", type=int, default=64, help="masks per image")
    ap.add_argument("--rounds", type=int, default=11, help="predictions per mask")
    ap.add_argument("--steps", type=int, default=5, help="timed steps of each implementation")
    ap.add_argument(
        "--checkpoint-rounds",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="recompute each round in backward (default on: 64 masks x 11 rounds of activations fit)",
    )
    ap.add_argument("--cache-dir", default=None, help="default: a temporary folder, removed afterwards")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = segany.build_sam(args.model, img_size=args.img_size).to(device)
    batch = toy_batch(args.images, args.masks, args.img_size, device=device, generator=torch.Generator().manual_seed(0))
    cfg = prompt_cfg(args.rounds, args.checkpoint_rounds)
    with tempfile.TemporaryDirectory() as tmp:
        cache = EmbeddingCache(enabled=True, dir=args.cache_dir or tmp)
        impls = {
            "recompute": SamModule(copy.deepcopy(model), freeze_image_encoder=True).train(),
            "cached": SamModule(copy.deepcopy(model), freeze_image_encoder=True, embedding_cache=cache).train(),
        }
        del model
        opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5) for k, m in impls.items()}
        times: dict = {k: [] for k in impls}
        for k in impls:  # warm-up: allocator, kernels; fills the cache
            step(impls[k], opts[k], batch, cfg, 0, device)
        assert cache.misses == args.images and cache.hits == 0
        for i in range(args.steps):
            order = list(impls) if i % 2 == 0 else list(impls)[::-1]  # alternate who goes first
            for k in order:
                times[k].append(step(impls[k], opts[k], batch, cfg, 1 + i, device))
        assert cache.hits == args.images * args.steps
    print(
        f"{args.model} {args.img_size} px, {args.images} image(s) x {args.masks} masks x {args.rounds} rounds "
        f"per step, checkpoint_rounds={args.checkpoint_rounds}, "
        f"{device.type} ({torch.get_num_threads()} threads), {args.steps} steps each, alternating"
    )
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        each = ", ".join(f"{t:.2f}" for t in v)
        print(f"  {k:9s}: {med[k]:8.3f} s/step  {1 / med[k]:8.3f} steps/s   (steps: {each})")
    print(f"  speed-up : {med['recompute'] / med['cached']:.1f}x")


if __name__ == "__main__":
    main()
