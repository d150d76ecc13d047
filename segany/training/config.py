"""Early checks of a training config: fail before anything is built, naming the key. The values
of one node are checked where that node is built (prompting: PromptConfig; data: SampleConfig);
here only what no single node can check (missing nodes, precision x optimiser x clipping).
data.img_size against the model's input size: train.py follow_model_size, once the model is built
(from a checkpoint it may have its own)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from segany.utils.precision import check_precision

REQUIRED = ("model", "data", "trainer", "optim", "prompting", "loss", "module", "paths")


def check_train_config(cfg: DictConfig) -> None:
    """Fail before anything is built, naming the key."""
    for key in REQUIRED:
        if cfg.get(key) is None:
            raise ValueError(f"config: missing node '{key}' (see configs/train.yaml)")
    for key in ("model", "data", "trainer", "optim", "prompting", "loss", "module"):
        if "_target_" not in cfg[key]:
            raise ValueError(f"config: node '{key}' has no _target_")
    if OmegaConf.is_missing(cfg, "name"):
        raise ValueError("config: 'name' is not set (pick an experiment=..., or name=...)")
    for key, node in (cfg.get("callbacks") or {}).items():
        if node is not None and "_target_" not in node:
            raise ValueError(f"config: callbacks.{key} has no _target_")
    check_precision(cfg.get("precision", "auto"))
    precision = str(cfg.trainer.get("precision"))
    mixed = "mixed" in precision or precision in ("16", "bf16")  # Lightning's aliases of *-mixed
    if cfg.optim.get("fused") and cfg.trainer.get("gradient_clip_val") and mixed:
        # Lightning's mixed-precision plugin refuses to clip the gradients of a fused optimiser
        raise ValueError(
            f"config: optim.fused=true cannot be combined with precision={cfg.get('precision')} ({precision}) and "
            f"trainer.gradient_clip_val={cfg.trainer.gradient_clip_val}; set optim.fused=false"
        )
