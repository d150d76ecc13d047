"""Train SAM with the paper's recipe.

    python train.py                                 # experiment=demo: tiny model, synthetic data, CPU
    python train.py experiment=vit_b_sa1b data.train_shards=...   # see experiments/*.md
    python train.py experiment=demo trainer.max_steps=20 logger=csv

The run directory is <paths.root_dir>/<name>[_<SLURM job id>]; it holds checkpoints/,
config.yaml (the resolved config), and the logger's files. Re-running the same command
resumes from checkpoints/last.ckpt (resume=auto).
"""
from __future__ import annotations

import logging
import os

import hydra
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from segany.training.config import check_train_config, register_resolvers

log = logging.getLogger("train")
register_resolvers()


def build(cfg: DictConfig):
    """config -> (module, datamodule, trainer); also used by the tests."""
    check_train_config(cfg)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    model = instantiate(cfg.model)
    # _partial_: objects passed as instantiate() kwargs would be turned back into configs
    module = instantiate(cfg.module, _partial_=True, _convert_="all")(
        model=model, prompting=instantiate(cfg.prompting), loss=instantiate(cfg.loss), optim=instantiate(cfg.optim))
    module.run_config = run_config      # saved in every checkpoint (evaluate.py rebuilds the model from it)
    datamodule = instantiate(cfg.data)
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks)
    return module, datamodule, trainer


def resume_path(cfg: DictConfig):
    if cfg.get("resume") in (None, "none", False):
        return None
    if cfg.resume == "auto":
        last = os.path.join(cfg.paths.run_dir, "checkpoints", "last.ckpt")
        return last if os.path.isfile(last) else None
    if not os.path.isfile(cfg.resume):
        raise FileNotFoundError(f"resume={cfg.resume}: no such checkpoint")
    return cfg.resume


def train(cfg: DictConfig) -> dict:
    pl.seed_everything(cfg.seed, workers=True)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
    module, datamodule, trainer = build(cfg)
    os.makedirs(cfg.paths.run_dir, exist_ok=True)
    if trainer.global_rank == 0:
        OmegaConf.save(cfg, os.path.join(cfg.paths.run_dir, "config.yaml"), resolve=True)
    ckpt = resume_path(cfg)
    log.info("run dir %s; %s", cfg.paths.run_dir, f"resuming from {ckpt}" if ckpt else "fresh start")
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    # ModelCheckpoint saves every n steps; the final state is always saved as last.ckpt too
    trainer.save_checkpoint(os.path.join(cfg.paths.run_dir, "checkpoints", "last.ckpt"))
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
