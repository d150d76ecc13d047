"""One frozen-encoder fine-tuning step of SAM vit_b at 1024 px with box prompts: segany's training step
against Hugging Face ``transformers.SamModel`` with the loop of the widely copied HF SAM fine-tuning
tutorial, on the same batch, alternating in one process.

    python benchmarks/finetune_vs_hf.py                                # 2 images x 8 masks, 3 steps after 1 warm-up
    OMP_NUM_THREADS=1 python benchmarks/finetune_vs_hf.py --threads 1  # the CPU figure in experiments/speed.md
    python benchmarks/finetune_vs_hf.py --recipe --rounds 2            # plus segany's full prompting recipe
    python benchmarks/finetune_vs_hf.py --device cuda --images 4 --masks 16 --rounds 10

The batch: B synthetic scenes (segany.data.scenes.make_scene, drawn at 256 px and resized to 1024),
N masks each, the GT box of each mask as its prompt. ``SamProcessor`` (transformers) turns the uint8
images and boxes into ``pixel_values`` / ``input_boxes``; every arm gets those pixel values (the
printed check: segany's own normalisation of the same images differs from them by rounding only).
The loss targets are the masks at 256 px (area > 0.5), the decoder's grid, for every one-round arm.
Both models are vit_b with random weights (HF ``SamConfig()``, ``segany.build_sam("vit_b")``), seeded.

One step, per arm (a step = forward, loss, backward, optimiser step, as the loop below times it):
  hf             ``model(pixel_values=..., input_boxes=..., multimask_output=False)`` (the image
                 encoder runs in every step; its and the prompt encoder's parameters are frozen with
                 ``requires_grad_(False)``, as the tutorial does) -> ``pred_masks`` (B, N, 1, 256, 256)
                 as B*N one-channel samples -> dice + BCE (below) -> Adam(mask_decoder, lr 1e-5).
  segany         ``SamModule(freeze_image_encoder=True, freeze_prompt_encoder=True)`` with one round of
                 box prompts (``prompting.point_rounds=0 mask_rounds=0 p_box=1 box_noise_frac=0
                 resolution=low``): what ``SamModule.training_step`` runs, without Lightning's logging:
                 ``module.embed`` (encoder under no_grad) -> ``simulate`` (prompt encoder, decoder, SamLoss:
                 focal : dice 20 : 1 + IoU MSE, at 256 px) -> / valid masks -> backward -> the module's
                 own optimiser (``configure_optimizers``: AdamW over the mask decoder).
  segany+cache   the same with ``module.embedding_cache`` on (bf16 entries in a temporary folder, filled
                 by an untimed step first): the encoder does not run.
  segany recipe  (--recipe) ``configs/experiment/finetune.yaml``'s module: image encoder frozen, the
                 prompting defaults of configs/prompting/sam.yaml (11 rounds: 1 + 8 point + 2 mask, box or
                 point 50/50, multimask for point rows, loss at 1024 px) with per-round recomputation on
                 (``prompting.checkpoint_rounds=true``: 8 masks x 11 rounds of full-resolution activations
                 do not fit a 23 GB CPU machine), the prompt encoder trained too; more work per step.

The hf loss is MONAI's ``DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean")`` written out
(MONAI is not a dependency): per sample and channel dice = 1 - (2 sum(p t) + 1e-5) / (sum(p^2) +
sum(t^2) + 1e-5), p = sigmoid(logits), mean over samples; plus BCE-with-logits, mean over pixels
(MONAI's DiceCELoss takes BCE for one-channel input); weights 1 and 1.

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` during a step minus the allocated bytes at its
start (what the step adds on top of the weights, gradients and optimiser state resident before it;
the maximum over the timed steps); on the CPU, the last warm-up step of each arm (an extra step
without warm-up) runs under ``torch.profiler`` with ``profile_memory``: the peak of the running sum
of its CPU allocation events (tensor bytes from torch's CPU allocator above the step's start, not
the process RSS; blocks allocated before the step and freed in it are not subtracted, an
overcount of at most those, e.g. the previous step's gradients).

Time: wall seconds per step (synchronised on CUDA), median over the timed steps, and on the CPU also
the process CPU time per step (``time.process_time``): with ``--threads 1`` the step's own compute,
steadier than the wall time where other processes share the cores.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import cv2
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import segany  # noqa: E402
from segany.data.scenes import make_scene  # noqa: E402
from segany.modeling.constants import PIXEL_MEAN, PIXEL_STD  # noqa: E402
from segany.training import EmbeddingCache, PromptConfig, SamModule, simulate  # noqa: E402

MB = 2**20
ONE_BOX_ROUND = dict(point_rounds=0, mask_rounds=0, p_box=1.0, box_noise_frac=0.0, resolution="low")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def scenes(images: int, masks: int, size: int = 1024, seed: int = 0):
    """(B, size, size, 3) uint8 RGB, (B, N, size, size) bool masks: synthetic scenes drawn at 256 px
    (redrawn until one has N visible objects), resized to ``size`` (image bilinear, masks nearest)."""
    ims, ms, N = [], [], masks
    for i in range(images):
        for attempt in range(100):
            rng = np.random.default_rng([seed, i, attempt])
            image, found = make_scene(rng, 256, 256, N + 2)
            if len(found) >= N:
                break
        else:
            raise RuntimeError(f"no synthetic scene with {masks} visible objects in 100 draws (use fewer --masks)")
        ims.append(cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR))
        ms.append([cv2.resize(m.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) for m in found[:N]])
    return np.stack(ims), torch.from_numpy(np.array(ms)).bool()


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(B, N, S, S) bool -> (B, N, 4) xyxy float, x1 / y1 one past the last pixel (segany's boxes)."""
    S = masks.shape[-1]
    ar = torch.arange(S)
    xs, ys = masks.any(-2), masks.any(-1)  # (B, N, S)
    lo = lambda m: torch.where(m, ar, S).min(-1).values  # noqa: E731
    hi = lambda m: torch.where(m, ar, -1).max(-1).values + 1  # noqa: E731
    return torch.stack((lo(xs), lo(ys), hi(xs), hi(ys)), -1).float()


def dice_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MONAI ``DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean")`` of (M, 1, H, W) logits
    and 0/1 targets: mean over (M, 1) of 1 - (2 sum(p t) + 1e-5) / (sum(p^2) + sum(t^2) + 1e-5), plus
    BCE-with-logits averaged over every pixel."""
    p = torch.sigmoid(logits)
    hw = (-2, -1)
    dice = 1 - (2 * (p * target).sum(hw) + 1e-5) / ((p * p).sum(hw) + (target * target).sum(hw) + 1e-5)
    return dice.mean() + F.binary_cross_entropy_with_logits(logits, target)


class HfArm:
    """transformers.SamModel and the tutorial's loop: frozen vision + prompt encoders, Adam on the decoder."""

    label = "hf (transformers SamModel)"

    def __init__(self, inputs: dict, gt_low: torch.Tensor, device):
        from transformers import SamConfig, SamModel

        torch.manual_seed(0)
        self.model = SamModel(SamConfig()).to(device)
        for name, p in self.model.named_parameters():
            if name.startswith("vision_encoder") or name.startswith("prompt_encoder"):
                p.requires_grad_(False)
        self.model.train()
        self.opt = torch.optim.Adam(self.model.mask_decoder.parameters(), lr=1e-5, weight_decay=0)
        self.pixel_values = inputs["pixel_values"].to(device)
        self.boxes = inputs["input_boxes"].to(device)
        self.gt = gt_low.flatten(0, 1)[:, None].float().to(device)  # (B*N, 1, 256, 256)

    def opt_params(self) -> list:
        return [p for g in self.opt.param_groups for p in g["params"]]

    def step(self, seed: int) -> float:
        out = self.model(pixel_values=self.pixel_values, input_boxes=self.boxes, multimask_output=False)
        pred = out.pred_masks.flatten(0, 2)[:, None]  # (B, N, 1, h, w) -> (B*N, 1, h, w)
        loss = dice_ce(pred, self.gt)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.item()


class SeganyArm:
    """SamModule's training step (embed -> simulate -> / valid masks), backward, its optimiser."""

    def __init__(self, label, model, batch: dict, prompting: PromptConfig, freeze_prompt_encoder=True, cache=None):
        self.label = label
        self.module = SamModule(
            model,
            prompting=prompting,
            freeze_image_encoder=True,
            freeze_prompt_encoder=freeze_prompt_encoder,
            embedding_cache=cache,
        ).train()
        self.opt = self.module.configure_optimizers()["optimizer"]
        self.batch = batch

    def opt_params(self) -> list:
        return [p for g in self.opt.param_groups for p in g["params"]]

    def step(self, seed: int) -> float:
        torch.manual_seed(seed)  # the prompts of the step (SamModule reseeds per step, too)
        b, m = self.batch, self.module
        emb = m.embed(b["image"], b["image_id"])
        out = simulate(m.model, emb, b, m.prompting, m.loss_fn)
        loss = out["loss"] / out["n_valid"].float().clamp(min=1)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item()


def timed(arm, seed: int, device) -> tuple:
    """(wall seconds, process CPU seconds, CUDA bytes the step added at its peak or None, loss) of one step."""
    base = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    loss = arm.step(seed)
    sync(device)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = None if base is None else torch.cuda.max_memory_allocated(device) - base
    return dt, cpu, peak, loss


def cpu_peak(arm, seed: int) -> int:
    """Peak bytes above the start of one step, from torch.profiler's CPU allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        arm.step(seed)
    ev = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type().name == "CPU"]
    ev.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for e in ev:
        running += e.nbytes()
        peak = max(peak, running)
    return peak


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2, help="images per step (B)")
    ap.add_argument("--masks", type=int, default=8, help="masks (box prompts) per image (N)")
    ap.add_argument("--rounds", type=int, default=3, help="timed steps of each arm, alternating")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps of each arm first")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--no-cache", action="store_true", help="leave out the segany+cache arm")
    ap.add_argument("--recipe", action="store_true", help="add segany with its full prompting recipe (11 rounds)")
    ap.add_argument("--no-memory", dest="memory_off", action="store_true", help="CPU: no step under torch.profiler")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from transformers import SamImageProcessor, SamProcessor

    S = 1024
    images, masks = scenes(args.images, args.masks, S)  # (B, S, S, 3) uint8, (B, N, S, S) bool
    boxes = mask_boxes(masks)  # (B, N, 4)
    processor = SamProcessor(image_processor=SamImageProcessor())
    inputs = processor(images=list(images), input_boxes=boxes.tolist(), return_tensors="pt")
    own = (torch.from_numpy(images).float() - torch.tensor(PIXEL_MEAN)) / torch.tensor(PIXEL_STD)
    diff = (own.permute(0, 3, 1, 2) - inputs["pixel_values"]).abs().max().item()
    box_diff = (inputs["input_boxes"].float() - boxes).abs().max().item()
    low = F.avg_pool2d(masks.flatten(0, 1)[:, None].float(), 4).view(*masks.shape[:2], S // 4, S // 4) > 0.5
    B, N = masks.shape[:2]
    batch = {
        "image": inputs["pixel_values"],
        "masks": masks,
        "masks_lowres": low,
        "valid": torch.ones(B, N, dtype=torch.bool),
        "boxes": boxes,
        "input_size": torch.full((B, 2), S, dtype=torch.long),
        "original_size": torch.full((B, 2), S, dtype=torch.long),
        "image_id": [f"scene{i}" for i in range(B)],
    }
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    torch.manual_seed(0)
    sam = segany.build_sam("vit_b", img_size=S).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        arms = [HfArm(inputs, low, device)]
        one = PromptConfig(**ONE_BOX_ROUND)
        arms.append(SeganyArm("segany (1 box round)", copy.deepcopy(sam), batch, one))
        if not args.no_cache:
            cache = EmbeddingCache(enabled=True, dir=tmp)
            arms.append(SeganyArm("segany+cache (1 box round)", copy.deepcopy(sam), batch, one, cache=cache))
            arms[-1].step(0)  # fills the cache (untimed)
        if args.recipe:  # the prompting defaults, per-round recomputation on
            recipe = PromptConfig(checkpoint_rounds=True)
            arms.append(SeganyArm("segany recipe (11 rounds)", copy.deepcopy(sam), batch, recipe, False))
        del sam
        profiled = device.type == "cpu" and not args.memory_off
        times = {a.label: [] for a in arms}
        cpus = {a.label: [] for a in arms}
        peaks = {a.label: [] for a in arms}
        losses = {a.label: [] for a in arms}
        for r in range(args.warmup + args.rounds):
            order = arms if r % 2 == 0 else arms[::-1]  # alternate who goes first
            for a in order:
                if profiled and r == args.warmup - 1:  # the last warm-up step, under the profiler
                    peaks[a.label].append(cpu_peak(a, 1 + r))
                    continue
                dt, cpu, peak, loss = timed(a, 1 + r, device)
                losses[a.label].append(loss)
                if r >= args.warmup:
                    times[a.label].append(dt)
                    cpus[a.label].append(cpu)
                    if peak is not None:
                        peaks[a.label].append(peak)
        if profiled and args.warmup == 0:  # an extra step
            for a in arms:
                peaks[a.label].append(cpu_peak(a, 1000))
    threads = f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else ""
    print(
        f"vit_b {S} px, {B} image(s) x {N} box prompts per step, frozen image encoder, random weights; "
        f"{device.type}{threads}; {args.rounds} timed steps each after {args.warmup} warm-up, alternating"
    )
    print(f"  inputs: SamProcessor pixel_values vs segany's normalisation max |diff| {diff:.1e}, boxes {box_diff:.1e}")
    mem = "peak MB above the step's start " + ("(CUDA allocated)" if device.type == "cuda" else "(CPU, profiled step)")
    trainable = ", ".join(f"{a.label} {sum(p.numel() for p in a.opt_params()) / 1e6:.3f} M" for a in arms)
    print(f"  parameters in the optimiser: {trainable}")
    print(f"  {'arm':28s} {'s/step':>8s} {'steps/s':>8s} {'vs hf':>6s}  {mem if any(peaks.values()) else ''}")
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = med[arms[0].label]
    cmed = {k: statistics.median(v) for k, v in cpus.items()}
    for a in arms:
        k = a.label
        pk = f"{max(peaks[k]) / MB:9.0f}" if peaks[k] else ""
        each = ", ".join(f"{t:.2f}" for t in times[k])
        print(f"  {k:28s} {med[k]:8.2f} {1 / med[k]:8.3f} {ref / med[k]:5.2f}x  {pk}   (steps: {each} s)")
    if device.type == "cpu":  # with --threads 1: the step's compute, without the time other processes had the core
        print("  process CPU time per step (median; vs hf):")
        for k, v in cmed.items():
            each = ", ".join(f"{t:.2f}" for t in cpus[k])
            print(f"  {k:28s} {v:8.2f} s {cmed[arms[0].label] / v:5.2f}x   (steps: {each} s)")
    print("  losses (first, last step): " + "; ".join(f"{k} {v[0]:.3f} -> {v[-1]:.3f}" for k, v in losses.items()))


if __name__ == "__main__":
    main()
