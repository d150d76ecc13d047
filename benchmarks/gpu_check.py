"""GPU acceptance check: the paper recipes' training step and the mask generator on one GPU,
one command, under 10 minutes.

    python benchmarks/gpu_check.py --out gpu_check.json                          # one GPU, full size
    python benchmarks/gpu_check.py --device cpu --size tiny --out gpu_check.json  # CPU smoke run (tests)

Runs, each through the training code path train.py uses (the recipe's Hydra config composed
and instantiated as train.py's build() does, a Lightning Trainer with the recipe's strategy and
precision, SamModule.training_step -> segany.training.simulation.simulate), on a toy batch of
ellipses (segany/testing/toy.py) repeated every step:

  fsdp_vit_h  experiment=vit_h_sa1b: ViT-H at 1024 px, 1 image x 64 masks x 11 rounds, FSDP2
              (shard_sam on a 1-rank process group), bf16, activation checkpointing per ViT block,
              per-round recomputation (prompting.checkpoint_rounds)
  ddp_vit_b   experiment=vit_b_sa1b with configs/strategy/ddp.yaml: ViT-B, same batch, DDP
  amg         segany.SamAutomaticMaskGenerator at its defaults on one 1024 px image (ViT-H;
              random weights unless --amg-checkpoint)

Per training run: step time (median of the timed steps), images/s and masks/s, peak memory
(torch.cuda.max_memory_allocated over the timed steps), FLOPs per step counted with
torch.utils.flop_counter.FlopCounterMode: executed (one real step: recomputation included) and
model FLOPs (the same step without recomputation, counted on the meta device: no compute), and
MFU = model FLOPs / step time / the device's bf16 dense peak (HFU with the executed FLOPs). The
peak comes from a table by device name, else from a measured bf16 matmul.

--size tiny: vit_tiny at 256 px, 2 masks x 2 rounds, the mask generator on an 8 x 8 grid, for
the CPU (tests/test_gpu_check.py). On the CPU everything runs in fp32 (precision=fp32, which
FSDP's param_dtype follows) and the peak is a measured fp32 matmul: CPUs without bf16
instructions emulate bf16 (a tiny step took 80 s instead of well under 1 s).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.fx.experimental._config as fx_config
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import segany  # noqa: E402
from segany.testing.toy import toy_batch  # noqa: E402
from segany.training.simulation import simulate  # noqa: E402
from segany.utils.config import register_resolvers  # noqa: E402

GiB = 1024**3
# bf16 dense peak FLOP/s (no sparsity) by device name
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
SIZES = {
    # run -> (experiment, model override or None, image px, masks, point rounds, mask rounds)
    "full": {
        "fsdp_vit_h": ("vit_h_sa1b", None, 1024, 64, 8, 2),
        "ddp_vit_b": ("vit_b_sa1b", None, 1024, 64, 8, 2),
        "amg": ("vit_h", 1024, None),  # variant, image px, points per side (None: the default 32)
        "steps": (2, 5),  # warmup, timed
        "matmul": 8192,
    },
    "tiny": {
        "fsdp_vit_h": ("vit_h_sa1b", "vit_tiny", 256, 2, 1, 0),
        "ddp_vit_b": ("vit_b_sa1b", "vit_tiny", 256, 2, 1, 0),
        "amg": ("vit_tiny", 256, 8),
        "steps": (1, 2),
        "matmul": 512,
    },
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def recipe(experiment: str, model: str | None, pr: int, mr: int, cpu: bool, strategy: str | None = None):
    """The recipe's composed config with the check's rounds (and model, for --size tiny: its own
    image size, and strategy, as `strategy=ddp` on the command line); no MAE init file needed;
    fp32 on the CPU."""
    register_resolvers()
    over = [f"experiment={experiment}", "model.encoder_init=null", f"prompting.point_rounds={pr}"]
    over += [f"prompting.mask_rounds={mr}"] + ([f"model={model}"] if model else [])
    over += [f"strategy={strategy}"] if strategy else []
    fsdp = experiment == "vit_h_sa1b"  # the recipe that selects strategy=fsdp
    if fsdp:  # one rank, whatever the launcher's environment says
        over += ["trainer.strategy.data_parallel_size=1"]
    if cpu:
        over += ["precision=fp32"]  # FSDP's param_dtype follows it (configs/strategy/fsdp.yaml)
        over += ["loss.compile=false"]  # the eager loss: no C++ compile on the CPU
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=over)


def build_module(cfg, sharding=True):
    """SamModule with its model, prompting, loss and optim, as train.py's build() instantiates it."""
    module_cfg = cfg.module if sharding else OmegaConf.merge(cfg.module, {"sharding": None})
    return instantiate(module_cfg, _convert_="all")


class Repeat(torch.utils.data.IterableDataset):
    """The same toy batch every step (made once: its cost stays out of the step time)."""

    def __init__(self, batch):
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


class StepTimer(pl.Callback):
    """Times the training steps after `warmup` (optimiser step included), peak memory over them;
    the step after the timed ones runs under FlopCounterMode."""

    def __init__(self, device: torch.device, warmup: int, timed: int):
        self.device, self.warmup, self.timed = device, warmup, timed
        self.times, self.peak, self.flops, self._counter = [], None, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if batch_idx == self.warmup + self.timed:
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()
        sync(self.device)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sync(self.device)
        dt = time.perf_counter() - self._t0
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops, self._counter = self._counter.get_total_flops(), None
        elif batch_idx >= self.warmup:
            self.times.append(dt)
            if batch_idx == self.warmup + self.timed - 1 and self.device.type == "cuda":
                self.peak = torch.cuda.max_memory_allocated(self.device) / GiB


def model_flops(cfg, batch: dict) -> int:
    """FLOPs of one training step (encoder, all rounds, backward) without recomputation, counted
    on the meta device: the same model and simulate() call, shapes only."""
    cfg = OmegaConf.merge(cfg, {"prompting": {"checkpoint_rounds": False}})
    with torch.device("meta"):
        module = build_module(cfg, sharding=False)
    meta = {k: v.to("meta") if torch.is_tensor(v) else v for k, v in batch.items()}
    old = fx_config.meta_nonzero_assume_all_nonzero
    fx_config.meta_nonzero_assume_all_nonzero = True  # simulate() picks the valid rows: all are
    try:
        with FlopCounterMode(display=False) as fc:
            emb = module.embed(meta["image"])
            out = simulate(module.model, emb, meta, module.prompting, module.loss_fn)
            out["loss"].backward()
    finally:
        fx_config.meta_nonzero_assume_all_nonzero = old
    return fc.get_total_flops()


def train_run(name: str, spec: tuple, steps: tuple, device: torch.device, peak: float, tmp: str) -> dict:
    experiment, model, img, masks, pr, mr = spec
    ddp = name.startswith("ddp")
    cfg = recipe(experiment, model, pr, mr, cpu=device.type == "cpu", strategy="ddp" if ddp else None)
    warmup, timed = steps
    torch.manual_seed(0)
    batch = toy_batch(1, masks, img, generator=torch.Generator().manual_seed(0))
    module = build_module(cfg)
    strategy = instantiate(cfg.trainer.strategy)  # DDP, or the recipe's FSDP2 with data_parallel_size = 1 rank
    timer = StepTimer(device, warmup, timed)
    trainer = instantiate(
        cfg.trainer,
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index] if device.type == "cuda" else 1,
        num_nodes=1,
        strategy=strategy,
        max_steps=warmup + timed + 1,
        max_time=None,
        accumulate_grad_batches=1,
        logger=False,
        callbacks=[timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=tmp,
    )
    loader = torch.utils.data.DataLoader(Repeat(batch), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    step = statistics.median(timer.times)
    mflops = model_flops(cfg, batch)
    result = {
        "experiment": experiment,
        "variant": cfg.model.variant,
        "img_size": img,
        "masks": masks,
        "rounds": 1 + pr + mr,
        "strategy": type(trainer.strategy).__name__,
        "precision": str(cfg.trainer.precision),
        "sharding": OmegaConf.to_container(cfg.module.sharding, resolve=True) if name.startswith("fsdp") else None,
        "checkpoint_rounds": bool(cfg.prompting.checkpoint_rounds),
        "step_times_s": timer.times,
        "step_time_s": step,
        "images_per_s": 1 / step,
        "masks_per_s": masks / step,
        "peak_memory_gib": timer.peak,
        "flops_per_step": timer.flops,
        "model_flops_per_step": mflops,
        "mfu": mflops / step / peak,
        "hfu": (timer.flops or 0) / step / peak,
    }
    del trainer, module, strategy
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def scene_image(size: int) -> np.ndarray:
    """(size, size, 3) uint8: coloured ellipses on a grey gradient."""
    b = toy_batch(1, 16, size, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    img = torch.linspace(60, 190, size)[None, :, None].expand(size, size, 3).clone()
    for m in b["masks"][0]:
        img[m] = torch.randint(0, 256, (3,), generator=g).float()
    return img.to(torch.uint8).numpy()


def amg_run(spec: tuple, device: torch.device, checkpoint: str | None, images: int) -> dict:
    variant, size, points = spec
    sam = segany.build_sam(variant, checkpoint=checkpoint).to(device).eval()
    # defaults (32 x 32 points, 64 per batch, the release's thresholds); tiny: fewer points
    gen = segany.SamAutomaticMaskGenerator(sam, **({"points_per_side": points} if points else {}))
    img = scene_image(size)
    with torch.inference_mode():
        gen.generate(img)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        n = [len(gen.generate(img)) for _ in range(images)]
        sync(device)
    dt = (time.perf_counter() - t0) / images
    del sam, gen
    return {
        "variant": variant,
        "img_size": size,
        "points_per_side": points or 32,
        "weights": checkpoint or "random init (mask counts differ from a trained model)",
        "seconds_per_image": dt,
        "images_per_s": 1 / dt,
        "masks_per_image": statistics.mean(n),
    }


def device_peak(device: torch.device, n: int) -> tuple[float, str]:
    """Dense peak FLOP/s: bf16 from the table by device name, else a measured n^3 matmul (bf16
    on a GPU, fp32 on the CPU, the dtype the CPU runs use)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in PEAK_BF16.items():
            if key in name:
                return flops, f"table: {key}"
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    reps, t0 = 5, time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0), f"measured: {n}^3 {str(dtype)[6:]} matmul"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--amg-checkpoint", default=None, help="released SAM .pth for the mask generator")
    ap.add_argument("--amg-images", type=int, default=None, help="images timed (default 3, tiny 1)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # as train.py
    os.environ.setdefault("WANDB_MODE", "offline")
    size = SIZES[args.size]
    peak, source = device_peak(device, size["matmul"])
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "size": args.size,
        "peak_flops": peak,
        "peak_source": source,
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("fsdp_vit_h", "ddp_vit_b"):
            pl.seed_everything(0, verbose=False)
            report["runs"][name] = r = train_run(name, size[name], size["steps"], device, peak, tmp)
            mem = f"{r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else "n/a"
            print(
                f"[{name}] {r['variant']} {r['img_size']} px, {r['masks']} masks x {r['rounds']} rounds, "
                f"{r['strategy']}: {r['step_time_s']:.3f} s/step, {r['images_per_s']:.2f} images/s, "
                f"peak {mem}, MFU {100 * r['mfu']:.1f} % (HFU {100 * r['hfu']:.1f} %)",
                flush=True,
            )
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    n_amg = args.amg_images or (3 if args.size == "full" else 1)
    report["amg"] = a = amg_run(size["amg"], device, args.amg_checkpoint, n_amg)
    print(f"[amg] {a['variant']} {a['img_size']} px: {a['images_per_s']:.2f} images/s", flush=True)
    report["wall_s"] = time.perf_counter() - t_start
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out} ({report['wall_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
