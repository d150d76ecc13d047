"""Loggers: wandb by default, offline unless credentials exist, never a login prompt."""

from __future__ import annotations

import logging
import netrc
import os
from typing import Optional

log = logging.getLogger(__name__)


def wandb_credentials() -> bool:
    """True when WANDB_API_KEY is set or ~/.netrc (or $NETRC) has an api.wandb.ai login."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_offline(offline: Optional[bool] = None) -> bool:
    """Whether a wandb run is offline: ``offline`` when it is given, else when WANDB_MODE asks for
    offline / dryrun / disabled or no credentials are configured (so wandb never asks for a key).
    Used by the training logger below and the evaluation report."""
    if offline is None:
        return os.environ.get("WANDB_MODE") in ("offline", "dryrun", "disabled") or not wandb_credentials()
    return bool(offline)


def wandb_logger(
    project: str = "segany", name: Optional[str] = None, save_dir: str = ".", offline: Optional[bool] = None, **kwargs
):
    """pytorch_lightning WandbLogger; offline when ``offline`` is True, or when it is None and
    no credentials are configured (then WANDB_MODE=offline, so wandb never asks for a key)."""
    from pytorch_lightning.loggers import WandbLogger

    offline = wandb_offline(offline)
    if offline:
        os.environ["WANDB_MODE"] = (
            os.environ.get("WANDB_MODE") if os.environ.get("WANDB_MODE") == "disabled" else "offline"
        )
        log.info("wandb offline (no API key / netrc login); sync later with `wandb sync %s/wandb`", save_dir)
    os.makedirs(save_dir, exist_ok=True)
    return WandbLogger(project=project, name=name, save_dir=save_dir, offline=offline, **kwargs)
