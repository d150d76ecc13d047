"""Memory per rank for SAM training, DDP vs FSDP2, with and without activation checkpointing.

    python benchmarks/memory.py                        # vit_h, 1024 px, 64 masks x 11 rounds, 8/64/256 ranks
    python benchmarks/memory.py --variant vit_l --ranks 8 16

Parameters, gradients and AdamW state come from the real parameter count (model built on
the meta device). Activations are the bytes autograd saves for backward, counted with
saved-tensor hooks per layer: one windowed ViT block, one global-attention block, the neck,
and one decoder round per mask. They are counted on the meta device at full scale (exact
shapes and dtypes, no compute); `--check` first verifies on the CPU, at small scale with real
compute, that the meta count equals the real one. Activation dtype: bf16 (autocast under
DDP, the bf16 MixedPrecisionPolicy under FSDP); the decoder is counted in fp32 and halved.

Per rank (P parameters, N ranks, 1 image per rank):
  DDP   weights fp32 4P, grads fp32 4P, AdamW 8P, + a bf16 copy of the weights used by autocast 2P
  FSDP  weights 4P/N, grads 4P/N, AdamW 8P/N, + unsharded bf16 weights and grads of the units
        in flight (the current and the prefetched block: 2 x 2 x 2 x block params)
  activations: encoder (every block's saved tensors, or with activation checkpointing only each
        block's input plus one block recomputed) + decoder rounds (64 x 11 x per-mask-round, or
        with per-round recomputation the fed-back logits of every round plus one round's).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import memory as decoder_memory  # noqa: E402
from train_step import saved_bytes

import segany  # noqa: E402

GiB = 1024**3


def block_activations(variant: str, img_size: int, device: str, dtype) -> dict:
    """Saved bytes of one windowed block, one global block, the neck; block input bytes."""
    with torch.device(device):
        model = segany.build_sam(variant, img_size=img_size).to(dtype)
    enc = model.image_encoder
    h = img_size // 16
    C = enc.blocks[0].norm1.normalized_shape[0]
    x = (
        torch.randn(1, h, h, C, device=device, dtype=dtype, requires_grad=True)
        if device != "meta"
        else torch.empty(1, h, h, C, device=device, dtype=dtype, requires_grad=True)
    )
    glob = [i for i, b in enumerate(enc.blocks) if getattr(b, "window_size", 0) == 0]
    win = [i for i in range(len(enc.blocks)) if i not in glob]
    out = {
        "blocks": len(enc.blocks),
        "global": len(glob),
        "window_block": saved_bytes(lambda: enc.blocks[win[0]](x), model) if win else 0,
        "global_block": saved_bytes(lambda: enc.blocks[glob[0]](x), model) if glob else 0,
        "neck": saved_bytes(lambda: enc.neck(x.permute(0, 3, 1, 2)), model),
        "block_input": x.numel() * x.element_size(),
        "params": sum(p.numel() for p in model.parameters()),
        "block_params": sum(p.numel() for p in enc.blocks[0].parameters()),
    }
    return out


def check_meta_matches_cpu() -> None:
    for name in ("window_block", "global_block", "neck"):
        real = block_activations("vit_tiny", 256, "cpu", torch.float32)[name]
        meta = block_activations("vit_tiny", 256, "meta", torch.float32)[name]
        status = "ok" if real == meta else "MISMATCH"
        print(f"check {name:13s} cpu {real / 2**20:8.2f} MiB  meta {meta / 2**20:8.2f} MiB  {status}")
        if real != meta:
            raise SystemExit("meta-device counting differs from real CPU counting")


def table(variant: str, img_size: int, masks: int, rounds: int, ranks: list, gpu_gib: float) -> None:
    dtype = torch.bfloat16
    b = block_activations(variant, img_size, "meta", dtype)
    # the decoder's float tensors (prompt PE, masks prompt) are built fp32 inside; count fp32 and
    # halve: with autocast / a bf16 policy its saved activations are bf16 (bool targets aside)
    d = {
        k: v / 2 if k != "params" else v
        for k, v in decoder_memory(variant, img_size, masks, rounds, dtype=torch.float32).items()
    }
    P = b["params"]
    n_win = b["blocks"] - b["global"]
    enc_full = n_win * b["window_block"] + b["global"] * b["global_block"] + b["neck"]
    enc_ac = b["blocks"] * b["block_input"] + max(b["window_block"], b["global_block"]) + b["neck"]
    dec_full = masks * rounds * d["per_mask_round"]
    dec_rc = masks * rounds * d["kept_per_mask_round"] + masks * d["per_mask_round"]
    print(f"\n{variant} at {img_size} px, {masks} masks x {rounds} rounds, 1 image per rank, bf16 activations")
    print(
        f"parameters {P / 1e6:.1f}M; saved activations per image: windowed block "
        f"{b['window_block'] / GiB:.2f} GiB, global block {b['global_block'] / GiB:.2f} GiB, "
        f"block input {b['block_input'] / GiB:.3f} GiB; decoder {d['per_mask_round'] / 2**20:.1f} MiB "
        f"per mask per round"
    )
    print(
        f"encoder activations: {enc_full / GiB:.1f} GiB stored, {enc_ac / GiB:.1f} GiB with activation "
        f"checkpointing; decoder rounds: {dec_full / GiB:.1f} GiB stored, {dec_rc / GiB:.1f} GiB with "
        f"per-round recomputation"
    )
    print(
        f"\n| strategy | ranks | weights | grads | AdamW | in flight | act (no AC) | total (no AC) | act (AC + round recompute) | total (AC) | fits {gpu_gib:.0f} GiB |"  # noqa: E501
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for strat in ("ddp", "fsdp"):
        for n in ranks:
            if strat == "ddp":
                w, g, o, fl = 4 * P, 4 * P, 8 * P, 2 * P
            else:
                w, g, o = 4 * P / n, 4 * P / n, 8 * P / n
                fl = 2 * 2 * 2 * b["block_params"]
            states = w + g + o + fl
            no_ac = states + enc_full + dec_full
            ac = states + enc_ac + dec_rc
            fits = "AC only" if ac <= gpu_gib * GiB < no_ac else ("yes" if no_ac <= gpu_gib * GiB else "no")
            print(
                f"| {strat} | {n} | {w / GiB:.2f} | {g / GiB:.2f} | {o / GiB:.2f} | {fl / GiB:.2f} | "
                f"{(enc_full + dec_full) / GiB:.1f} | {no_ac / GiB:.1f} | {(enc_ac + dec_rc) / GiB:.1f} | "
                f"{ac / GiB:.1f} | {fits} |"
            )
            if strat == "ddp":
                break  # DDP replicates everything: the same at every rank count


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="vit_h")
    ap.add_argument("--img-size", type=int, default=1024)
    ap.add_argument("--masks", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 64, 256])
    ap.add_argument("--gpu-gib", type=float, default=80.0)
    ap.add_argument("--no-check", action="store_true", help="skip the CPU-vs-meta check")
    a = ap.parse_args(argv)
    if not a.no_check:
        check_meta_matches_cpu()
    table(a.variant, a.img_size, a.masks, a.rounds, a.ranks, a.gpu_gib)


if __name__ == "__main__":
    main()
