"""Train SAM with the paper's recipe.

    python train.py                                 # experiment=demo: tiny model, synthetic data, CPU
    python train.py experiment=vit_b_sa1b data.train_shards=SA1B_DIR   # see experiments/*.md
    python train.py experiment=demo trainer.max_steps=20 logger=csv

The run directory is <paths.root_dir>/<name>[_<SLURM job id>]; it holds checkpoints/,
config.yaml (the resolved config), and the logger's files. Re-running the same command
resumes from checkpoints/last.ckpt (resume=auto).
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from segany.modeling.checkpoint import architecture, verify_checkpoint
from segany.training.checkpointing import newest_verified, resume_candidates
from segany.training.config import check_train_config
from segany.utils.cli import check_overrides
from segany.utils.config import register_resolvers
from segany.utils.dist import launcher

log = logging.getLogger("train")
register_resolvers()


def build(cfg: DictConfig):
    """config -> (module, datamodule, trainer); also used by the tests."""
    check_train_config(cfg)
    module = instantiate(cfg.module, _convert_="all")  # SamModule with its model, prompting, loss, optim
    follow_model_size(cfg, module.model)
    # saved in every checkpoint; evaluate.py rebuilds the model from its top-level model node,
    # which records the architecture built (also when it was read from model.checkpoint)
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    if getattr(module.model, "config", None) is not None:
        module.run_config["model"] = {**module.run_config["model"], **architecture(module.model.config)}
    datamodule = instantiate(cfg.data)
    if cfg.get("mix") is not None:  # +mix=...: general data mixed into the training streams (configs/mix)
        datamodule = instantiate(cfg.mix, target=datamodule)
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks)
    apply_global_batch(cfg, trainer)
    return module, datamodule, trainer


def follow_model_size(cfg: DictConfig, model) -> None:
    """data.img_size: null means the model's input size (experiment=finetune: the size stored in,
    or read from, model.checkpoint); set here, before the data and callbacks are built."""
    if "img_size" not in cfg.data:
        return
    size = int(model.image_encoder.img_size)
    if cfg.data.img_size is None:
        cfg.data.img_size = size
        log.info("data.img_size: %d, the model's input size", size)
    elif int(cfg.data.img_size) != size:
        raise ValueError(
            f"config: data.img_size={cfg.data.img_size} but the model's input size is {size} "
            f"(model.checkpoint={cfg.model.get('checkpoint')}); set data.img_size=null to follow the model"
        )


def resume_path(cfg: DictConfig):
    """resume=auto: the newest checkpoint of the run that matches its manifest, walking back
    from the newest of checkpoints/last.ckpt (or last.ckpt.old, an interrupted directory swap),
    the hpc_ckpt_*.ckpt Lightning writes on a SLURM requeue signal and the periodic ones kept
    (segany.training.checkpointing.resume_candidates); each one skipped is logged with what
    differs. A checkpoint with no manifest (an older segany's, or made by hand) is taken
    unverified, with a log line. resume=last is the same but fails when there is nothing to
    resume; resume=PATH uses PATH, refused when it does not match its manifest."""
    if cfg.get("resume") in (None, "none", False):
        return None
    if cfg.resume in ("auto", "last"):
        found = resume_candidates(cfg.paths.run_dir)
        if not found and cfg.resume == "last":
            raise FileNotFoundError(f"resume=last: no checkpoint in {cfg.paths.run_dir}")
        return newest_verified(found) if found else None
    if not os.path.exists(cfg.resume):
        raise FileNotFoundError(f"resume={cfg.resume}: no such checkpoint")
    verify_checkpoint(cfg.resume)
    return cfg.resume


def apply_global_batch(cfg: DictConfig, trainer: pl.Trainer) -> None:
    """global_batch (images per optimiser step over all ranks) = data.batch_size x world size
    x accumulate_grad_batches. Sets the accumulation from the world size this job really
    has; fails before training when no whole number of micro-batches gives it.
    Without global_batch: trainer.accumulate_grad_batches as set (null: 1)."""
    gb = cfg.get("global_batch")
    set_acc = cfg.trainer.get("accumulate_grad_batches")
    bs = int(cfg.data.batch_size)
    if gb is None:
        acc = int(set_acc or 1)
    else:
        per_pass = bs * trainer.world_size
        if gb % per_pass:
            raise ValueError(
                f"global_batch={gb} cannot be met: data.batch_size={bs} x world size "
                f"{trainer.world_size} = {per_pass} images per pass does not divide it; change "
                f"trainer.devices / trainer.num_nodes or data.batch_size"
            )
        acc = gb // per_pass
        if set_acc not in (None, acc):
            raise ValueError(
                f"trainer.accumulate_grad_batches={set_acc} contradicts global_batch={gb} "
                f"(needs {acc} with {per_pass} images per pass); leave it null"
            )
    trainer.accumulate_grad_batches = acc
    if getattr(trainer, "global_rank", 0) == 0:
        launch = launcher()
        log.info(
            "global batch %d = %d per rank x %d ranks x %d accumulated (%s nodes x %s devices, %s)",
            bs * trainer.world_size * acc,
            bs,
            trainer.world_size,
            acc,
            getattr(trainer, "num_nodes", "?"),
            getattr(trainer, "num_devices", "?"),
            f"from {launch.launcher}" if launch else "no launcher",
        )


def resolve_data(datamodule, trainer: pl.Trainer) -> dict:
    """split -> {count, first, last} of the shards the run reads (datamodule.resolve_shards),
    logged on rank 0; {} for a datamodule without shards. Generated data (synthetic) is
    prepared first, on local rank 0 as Lightning would (then a no-op in fit)."""
    if not hasattr(datamodule, "resolve_shards"):
        return {}
    if trainer.local_rank == 0:
        datamodule.prepare_data()
    resolved = datamodule.resolve_shards()
    if trainer.global_rank == 0:
        for split, r in resolved.items():
            log.info("data %s: %d shards, %s ... %s", split, r["count"], r.get("first"), r.get("last"))
            for name, src in (r.get("sources") or {}).items():
                log.info("  source %s: %d shards, %s ... %s", name, src["count"], src["first"], src["last"])
    return resolved


def save_run_config(cfg: DictConfig, path: str, data_resolved: dict) -> None:
    """The resolved config, plus data_resolved (the shard counts this run really found)."""
    run = OmegaConf.to_container(cfg, resolve=True)
    if data_resolved:
        run["data_resolved"] = data_resolved
    OmegaConf.save(OmegaConf.create(run), path)


def train(cfg: DictConfig) -> dict:
    pl.seed_everything(cfg.seed, workers=True)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
    module, datamodule, trainer = build(cfg)
    data_resolved = resolve_data(datamodule, trainer)
    if data_resolved and getattr(module, "run_config", None) is not None:
        module.run_config["data_resolved"] = data_resolved  # in every checkpoint, as config.yaml
    os.makedirs(cfg.paths.run_dir, exist_ok=True)
    if trainer.global_rank == 0:
        save_run_config(cfg, os.path.join(cfg.paths.run_dir, "config.yaml"), data_resolved)
    ckpt = resume_path(cfg)
    log.info("run dir %s; %s", cfg.paths.run_dir, f"resuming from {ckpt}" if ckpt else "fresh start")
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)  # resume reads data only
    except RuntimeError as exc:  # a dead data-loader worker: name the shard and key it was reading
        loader = getattr(datamodule, "_train_loader", None)
        message = loader.worker_death(exc) if hasattr(loader, "worker_death") else None
        if message:
            raise RuntimeError(message) from exc
        raise
    # ModelCheckpoint saves every n steps; the final state is always saved as last.ckpt too, in full
    # (a save's weights_only=False: optimiser, loops and callbacks too, resumable; unset, Lightning says so)
    trainer.save_checkpoint(os.path.join(cfg.paths.run_dir, "checkpoints", "last.ckpt"), weights_only=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    check_overrides(sys.argv[1:])  # before Hydra: a key given twice (shell-expanded braces) is an error
    main()
