"""SamModule: the SAM training recipe as a LightningModule.

training_step = image encoder once per image -> ``simulate`` (all prompting rounds for all
masks, see simulation.py) -> loss / (valid masks across all ranks).
validation_step = the same simulation without gradients, plus the single-point protocol of
segany.evaluation at a few click counts, and a few images with their predicted masks.
At the end of each validation: the mean IoU and loss per round (``val_round/*``) and their
plot, with training's since the previous validation, as <run dir>/round_iou.png.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from typing import Optional, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import ModelParallelStrategy
from torch import nn

from segany.evaluation.protocol import ClickProtocol, interactive_eval
from segany.training.embedding_cache import EmbeddingCache
from segany.training.losses import SamLoss
from segany.training.nonfinite import NonFiniteGuard
from segany.training.optim import SamOptim
from segany.training.prompting import INIT, MASK, POINT, PromptConfig
from segany.training.schedule import WarmupStepDecay
from segany.training.sharding import ShardingConfig, is_sharded
from segany.training.simulation import simulate
from segany.training.visualize import draw_masks, plot_rounds

log = logging.getLogger(__name__)
KIND_LABELS = {INIT: "init", POINT: "pt", MASK: "mask"}


class SamModule(pl.LightningModule):
    """model: a ``segany.build_sam`` Sam (drop path / decoder dropout / init are its own keys).
    prompting, loss, optim: the PromptConfig, SamLoss and SamOptim built from the config nodes
    of the same names (configs/module/sam.yaml nests them, so ``instantiate(cfg.module)``
    builds everything). optim's lr milestones are fractions of ``trainer.max_steps``, read
    when the optimiser is built and again before every scheduler step (a run shortened
    while it trains, e.g. by TimeBudget, takes its schedule along). freeze_*: exclude a part
    from the optimiser (a frozen image encoder also runs in eval mode under no_grad).
    A model built with LoRA adapters (model.lora, segany.modeling.lora) arrives with its
    encoder weights frozen and its adapters trainable; freeze_image_encoder must then be false
    (it would freeze the adapters too). Checkpoints hold base weights and adapters as the
    model's state_dict has them; the reader and export merge them.
    embedding_cache: an EmbeddingCache (embedding_cache.py); when enabled (needs a frozen image
    encoder) each image's embedding is computed once, stored on disk and reused, looked up by
    the batch's ``image_id`` in training and ``val/<image_id>`` in validation.
    val_clicks: click counts of the single-point protocol logged in validation.
    val_images: how many validation images to draw per validation run.
    Per-round curves: training and validation steps add their rounds' IoU / loss sums and
    valid-mask counts (by round index: the mask rounds' positions vary between steps); each
    validation end sums them over ranks, logs ``val_round/iou_XX``, ``val_round/loss_XX`` and
    ``val_round/masks`` (the masks behind them), and draws both splits' mean IoU per round
    (x labels: the rounds' kinds in rank 0's validation batches) to
    <trainer.default_root_dir>/round_iou.png, with a copy per validation in
    round_iou/step<global step>.png (a wandb logger gets it as ``val_round/plot``).
    sharding: a ShardingConfig, the FSDP2 settings (strategy=fsdp, configs/strategy/fsdp.yaml),
    applied in configure_model; None without FSDP.
    seed: every training step reseeds torch's RNGs from (seed, global step, rank), so the
    prompts, dropout and drop path of step k are the same whether or not the run was
    interrupted and resumed before it (no RNG state needs to travel in checkpoints);
    validation reseeds from (seed, "val") so its numbers are comparable across a run.
    nonfinite: a NonFiniteGuard (nonfinite.py; on when None): a step with a non-finite loss or
    gradient norm is skipped on every rank and counted, a few in a row stop the run.
    trainable: regular expressions over the model's parameter names (``re.match``, e.g.
    ``mask_decoder\\.hf_``); when given, only the parameters they match train, every other one
    is frozen, and a part left with nothing to train counts as frozen (eval mode; a frozen image
    encoder runs under no_grad). HQ-SAM (experiment=hq_sam) trains its HQ parts only this way.
    An HQ-SAM model (model.hq_token) gets the encoder's early features with every embedding; the
    embedding cache does not store them (refused)."""

    def __init__(
        self,
        model: nn.Module,
        prompting: Optional[PromptConfig] = None,
        loss: Optional[SamLoss] = None,
        optim: Optional[SamOptim] = None,
        freeze_image_encoder: bool = False,
        freeze_prompt_encoder: bool = False,
        freeze_mask_decoder: bool = False,
        val_clicks=(1, 3),
        val_images: int = 4,
        run_config: Optional[dict] = None,
        sharding: Optional[ShardingConfig] = None,
        seed: int = 0,
        embedding_cache: Optional[EmbeddingCache] = None,
        nonfinite: Optional[NonFiniteGuard] = None,
        trainable: Optional[Sequence[str]] = None,
    ):
        super().__init__()
        self.model = model
        self.prompting = prompting or PromptConfig()
        self.loss_fn = loss or SamLoss()
        self.optim = optim or SamOptim()
        self.freeze = {
            "image_encoder": bool(freeze_image_encoder),
            "prompt_encoder": bool(freeze_prompt_encoder),
            "mask_decoder": bool(freeze_mask_decoder),
        }
        if self.freeze["image_encoder"] and getattr(model, "lora", None) is not None:
            raise ValueError(
                "module.freeze_image_encoder=true would freeze the model's LoRA adapters (model.lora); "
                "set module.freeze_image_encoder=false (the encoder's base weights stay frozen)"
            )
        for part, frozen in self.freeze.items():
            if frozen:
                getattr(self.model, part).requires_grad_(False)
        if trainable is not None:
            self._train_only(list(trainable))
        if all(self.freeze.values()):
            raise ValueError("module.freeze_*: all three parts frozen, nothing to train")
        self.val_protocol = ClickProtocol(clicks=tuple(val_clicks))
        self.val_images = int(val_images)
        self.run_config = run_config  # the resolved Hydra config, stored in checkpoints
        if sharding is not None and not isinstance(sharding, ShardingConfig):
            raise TypeError(f"module.sharding: expected a ShardingConfig (its node's _target_), got {type(sharding)}")
        self.sharding = sharding
        self.seed = int(seed)
        if self.seed < 0:
            raise ValueError(f"seed={seed!r}: must be >= 0 (it seeds numpy's SeedSequence)")
        self._faults: dict = {}
        if nonfinite is not None and not isinstance(nonfinite, NonFiniteGuard):
            raise TypeError(f"module.nonfinite: expected a NonFiniteGuard (its node's _target_), got {type(nonfinite)}")
        self.nonfinite = nonfinite if nonfinite is not None else NonFiniteGuard()
        self._val_drawn = 0
        self._rounds: dict = {}  # split -> (3, T) sums since the last validation end: IoU, loss, valid masks
        self._val_kinds: list = []  # per round, the kinds it had in this validation's batches
        if embedding_cache is not None and not isinstance(embedding_cache, EmbeddingCache):
            raise TypeError(
                f"module.embedding_cache: expected an EmbeddingCache (its node's _target_), got {type(embedding_cache)}"
            )
        self.embedding_cache = embedding_cache if embedding_cache is not None and embedding_cache.enabled else None
        if self.embedding_cache is not None:
            if not self.freeze["image_encoder"]:
                raise ValueError(
                    "module.embedding_cache.enabled=true needs module.freeze_image_encoder=true "
                    "(a trained encoder changes every embedding)"
                )
            if sharding is not None:
                raise ValueError("module.embedding_cache.enabled=true is not supported with FSDP (module.sharding)")
            if getattr(model, "hq", False):
                raise ValueError(
                    "module.embedding_cache.enabled=true with an HQ-SAM model (model.hq_token): the cache "
                    "does not store the encoder's early features the HQ token reads"
                )

    def _train_only(self, patterns: list) -> None:
        """module.trainable: freeze every parameter no pattern matches; a part with none left counts as frozen."""
        try:
            regexes = [re.compile(p) for p in patterns]
        except re.error as e:
            raise ValueError(f"module.trainable: {patterns!r} is not a list of regular expressions ({e})") from e
        matched = set()
        for name, param in self.model.named_parameters():
            hit = [r.pattern for r in regexes if r.match(name)]
            matched.update(hit)
            param.requires_grad_(bool(hit) and param.requires_grad)
        unmatched = [p for p in patterns if p not in matched]
        if unmatched:
            raise ValueError(f"module.trainable: {unmatched} match no parameter of the model (e.g. 'mask_decoder.hf_')")
        for part in self.freeze:
            if not any(p.requires_grad for p in getattr(self.model, part).parameters()):
                self.freeze[part] = True

    def setup(self, stage: str) -> None:
        """With the embedding cache: refuse image-changing augmentations of the datamodule."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.embedding_cache is not None and dm is not None:
            self.embedding_cache.check_augmentations(dm)

    def configure_model(self):
        """FSDP2: shard on the strategy's data-parallel mesh (called once per process by
        Lightning, before the optimiser is built)."""
        if is_sharded(self.model):
            return
        if self.sharding is None:
            if self.trainer is not None and isinstance(self.trainer.strategy, ModelParallelStrategy):
                raise ValueError(
                    "trainer.strategy is ModelParallelStrategy but module.sharding is not set "
                    "(use strategy=fsdp, which sets both)"
                )
            return
        self.sharding.apply(self.model, mesh=self.device_mesh["data_parallel"])

    # ---------------------------------------------------------------- helpers
    def train(self, mode: bool = True):
        super().train(mode)
        for part, frozen in self.freeze.items():  # frozen parts: no drop path / dropout
            if frozen:
                getattr(self.model, part).eval()
        return self

    def embed(self, images: torch.Tensor, keys=None):
        """(B, 3, S, S) normalised -> (B, 256, S/16, S/16), once per image per step; with the
        embedding cache on and the images' keys (the batch's image_id) given, from the cache.
        An HQ-SAM model: the pair (embedding, early block features (B, embed_dim, S/16, S/16))."""
        if self.embedding_cache is not None and keys is not None:
            return self.embedding_cache.embed(self.model.image_encoder, images, keys)
        encode = self.model.image_encoder.forward_interm if self.hq else self.model.image_encoder
        if self.freeze["image_encoder"]:
            with torch.no_grad():
                return encode(images)
        return encode(images)

    @property
    def hq(self) -> bool:
        return bool(getattr(self.model, "hq", False))

    def _split(self, embedded):
        """embed()'s output -> (embedding, early features or None)."""
        return embedded if self.hq else (embedded, None)

    def _global_count(self, n: torch.Tensor) -> torch.Tensor:
        n = n.detach().float()
        if self.trainer is not None and self.trainer.world_size > 1:
            n = self.trainer.strategy.reduce(n, reduce_op="sum")
        return n

    def _add_rounds(self, split: str, out: dict) -> None:
        T = out["round_iou"].numel()
        sums = torch.stack((out["round_iou"], out["round_loss"], out["n_valid"].float().expand(T))).detach()
        prev = self._rounds.get(split)
        self._rounds[split] = sums if prev is None else prev + sums

    # ---------------------------------------------------------------- steps
    def training_step(self, batch: dict, batch_idx: int):
        B = batch["image"].shape[0]
        emb, interm = self._split(self.embed(batch["image"], batch.get("image_id")))
        out = simulate(self.model, emb, batch, self.prompting, self.loss_fn, interm=interm)
        world = self.trainer.world_size if self.trainer is not None else 1
        n_global = self._global_count(out["n_valid"]).clamp(min=1)
        # DDP/FSDP average gradients over ranks: x world makes it sum / global valid masks
        loss = out["loss"] * world / n_global

        n_local = out["n_valid"].float().clamp(min=1)
        logs = {"train/loss": loss.detach()}
        for t, (l, i) in enumerate(zip(out["round_loss"], out["round_iou"])):
            logs[f"train_round/loss_{t:02d}"] = l / n_local
            logs[f"train_round/iou_{t:02d}"] = i / n_local
        logs["train/iou_last"] = out["round_iou"][-1] / n_local
        logs["train/masks_per_image"] = out["n_valid"].float() / B
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=B)
        self.log("train/loss_epoch", loss.detach(), on_step=False, on_epoch=True, prog_bar=True, batch_size=B)
        for k, v in (batch.get("faults") or {}).items():
            self._faults[k] = self._faults.get(k, 0) + int(v)
        if self._faults:
            self.log_dict({f"faults/{k}": float(v) for k, v in self._faults.items()}, on_step=True, batch_size=B)
        self._last_masks = int(out["n_valid"])
        self._add_rounds("train", out)
        return loss

    def step_seed(self, step: int, stream: int = 0) -> int:
        """A 63-bit seed from (seed, step, rank, stream), mixed by numpy's SeedSequence:
        independent streams per rank and step."""
        entropy = [self.seed, step, self.global_rank, stream]
        return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) >> 1

    def on_train_batch_start(self, batch, batch_idx):
        acc = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        # CPU and every CUDA device; micro-batches of one accumulated step get their own streams
        torch.manual_seed(self.step_seed(self.global_step, stream=2 + batch_idx % acc))
        self.nonfinite.images(batch.get("image_id"))
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        dt = time.perf_counter() - getattr(self, "_t0", time.perf_counter())
        if dt > 0:
            B = batch["image"].shape[0]
            opt = self.optimizers()
            lr = max(g["lr"] for g in opt.param_groups) if opt is not None else 0.0
            logs = {"perf/images_per_s": B / dt, "perf/masks_per_s": self._last_masks / dt, "train/lr": lr}
            if self.embedding_cache is not None:  # images embedded by this rank so far: from the cache / computed
                logs["perf/cache_hits"] = float(self.embedding_cache.hits)
                logs["perf/cache_misses"] = float(self.embedding_cache.misses)
            if self.nonfinite.enabled:  # steps skipped for a non-finite loss / gradient norm, this run so far
                logs["train/skipped_nonfinite"] = float(self.nonfinite.skipped)
                if self.nonfinite.grad_norm is not None:  # before clipping, the last optimiser step's
                    logs["train/grad_norm"] = self.nonfinite.grad_norm
            self.log_dict(logs, on_step=True, batch_size=B)

    def on_validation_epoch_start(self):
        self._val_drawn = 0
        self._rounds.pop("val", None)
        self._val_kinds = [set() for _ in range(self.prompting.num_rounds)]
        torch.manual_seed(self.step_seed(0, stream=1))  # the same validation prompts every time

    def validation_step(self, batch: dict, batch_idx: int):
        B = batch["image"].shape[0]
        # cache keys apart from training's: a split may reuse another split's keys for other images
        keys = None if batch.get("image_id") is None else [f"val/{k}" for k in batch["image_id"]]
        emb, interm = self._split(self.embed(batch["image"], keys))
        out = simulate(self.model, emb, batch, self.prompting, self.loss_fn, interm=interm)
        self._add_rounds("val", out)
        for seen, kind in zip(self._val_kinds, out["schedule"]):
            seen.add(kind)
        n = out["n_valid"].float().clamp(min=1)
        logs = {"val/loss": out["loss"] / n, "val/iou_last": out["round_iou"][-1] / n}
        ev = interactive_eval(self.model, batch, self.val_protocol, embeddings=emb, interm=interm)
        for k, v in ev["iou"].items():
            if ev["count"] > 0:
                logs[f"val/miou@{k}"] = float(np.mean(v))
        self.log_dict(logs, on_step=False, on_epoch=True, batch_size=B, sync_dist=True, prog_bar=False)
        if self.val_images > self._val_drawn and self.global_rank == 0:
            self._log_images(batch, ev, self.val_images - self._val_drawn)

    def on_validation_epoch_end(self):
        if self.trainer.sanity_checking:  # Lightning drops its logs; training's sums carry on
            self._rounds.pop("val", None)
            return
        zeros = torch.zeros(3, self.prompting.num_rounds, device=self.device)
        sums = torch.stack([self._rounds.pop(split, zeros) for split in ("val", "train")])  # (2, 3, T)
        if self.trainer.world_size > 1:  # every rank calls this, so the reduce always meets
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        (val_iou, val_loss), (train_iou, _) = (sums[:, :2] / sums[:, 2:].clamp(min=1)).tolist()
        n_val, n_train = sums[:, 2, 0].tolist()
        logs = {f"val_round/iou_{t:02d}": v for t, v in enumerate(val_iou)}
        logs.update({f"val_round/loss_{t:02d}": v for t, v in enumerate(val_loss)})
        logs["val_round/masks"] = n_val  # the valid masks of all ranks behind these means
        # already global: sync_dist only averages equal values (and keeps Lightning from warning under DDP)
        self.log_dict(logs, sync_dist=True)
        if self.global_rank == 0 and n_val > 0:
            kinds = ["/".join(sorted(KIND_LABELS.get(k, str(k)) for k in seen)) for seen in self._val_kinds]
            self._plot_rounds(kinds, val_iou, train_iou if n_train > 0 else None, val_loss)

    def _plot_rounds(self, kinds, val_iou, train_iou, val_loss):
        step, root = self.global_step, self.trainer.default_root_dir
        os.makedirs(os.path.join(root, "round_iou"), exist_ok=True)
        path = os.path.join(root, "round_iou", f"step{step:07d}.png")
        plot_rounds(path, kinds, val_iou, train_iou, val_loss, title=f"step {step}")
        shutil.copyfile(path, os.path.join(root, "round_iou.png"))
        if hasattr(self.logger, "log_image"):  # WandbLogger
            self.logger.log_image(key="val_round/plot", images=[path], step=step)

    def _log_images(self, batch, ev, k):
        images = draw_masks(batch, ev["pred_first"], ev["clicks_first"], max_images=k)
        self._val_drawn += len(images)
        if not images:
            return
        logger = self.logger
        if hasattr(logger, "log_image"):  # WandbLogger
            logger.log_image(key="val/predictions", images=list(images), step=self.global_step)
        elif self.trainer is not None:
            import cv2

            # the logger's directory as trainer.log_dir has it, without its broadcast: only rank 0 is here
            d = os.path.join(getattr(logger, "log_dir", None) or self.trainer.default_root_dir, "val_images")
            os.makedirs(d, exist_ok=True)
            for i, im in enumerate(images):
                cv2.imwrite(
                    os.path.join(d, f"step{self.global_step:07d}_{self._val_drawn - len(images) + i}.png"),
                    im[..., ::-1],
                )

    # ---------------------------------------------------------------- optimiser
    def configure_optimizers(self):
        max_steps = self._trainer.max_steps if self._trainer is not None else None
        opt, sched = self.optim(self.model, max_steps=max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self.nonfinite.observe(loss)  # the loss Lightning back-propagates, each micro-batch

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """The non-finite guard first (nonfinite.py): a skipped step's gradients are dropped, nothing
        to clip; else Lightning's clipping, as without this hook."""
        if self.nonfinite.enabled and self.nonfinite.check(self, optimizer):
            return
        self.clip_gradients(
            optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm
        )

    def lr_scheduler_step(self, scheduler, metric=None) -> None:
        """The schedule follows trainer.max_steps (shrunk by TimeBudget, or changed on resume)."""
        for fn in getattr(scheduler, "lr_lambdas", ()):
            if isinstance(fn, WarmupStepDecay):
                fn.set_max_steps(self.trainer.max_steps)
        scheduler.step()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.run_config is not None:
            checkpoint["segany_config"] = self.run_config
        checkpoint["segany_nonfinite"] = self.nonfinite.state_dict()  # the skip counters go on after a resume

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.nonfinite.load_state_dict(checkpoint.get("segany_nonfinite", {}))
