"""Evaluate a checkpoint with the interactive single-point protocol (segany/evaluation):
mIoU after 1, 3, 5, 9 clicks, default (most confident of 3 at click 1) and oracle, written
to metrics.json.

    python evaluate.py ckpt_path=runs/demo/checkpoints/last.ckpt       # held-out synthetic scenes
    python evaluate.py                                                  # untrained vit_tiny baseline
    python evaluate.py ckpt_path=sam_vit_b_01ec64.pth model=vit_b data=coco data.val_annotations=...
"""
from __future__ import annotations

import json
import logging
import os
import time

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from segany.evaluation import ClickProtocol, interactive_eval, summarize
from segany.training.config import register_resolvers

log = logging.getLogger("evaluate")
register_resolvers()


def load_model(cfg: DictConfig):
    """-> (Sam, description). A train.py checkpoint carries its resolved config; other
    inputs use cfg.model."""
    path = cfg.ckpt_path
    if path is None:
        torch.manual_seed(cfg.seed)
        return instantiate(cfg.model), "untrained"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ckpt_path={path}: no such file")
    if path.endswith(".pth"):
        return instantiate(cfg.model, checkpoint=path), f"official {path}"
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    run_cfg = ckpt.get("segany_config")
    model_cfg = OmegaConf.create(run_cfg["model"]) if run_cfg else cfg.model
    model = instantiate(model_cfg, checkpoint=None, encoder_init=None)
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    return model, f"{path} (step {ckpt.get('global_step')})"


def evaluate(cfg: DictConfig) -> dict:
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    model, what = load_model(cfg)
    model.to(device).eval()
    protocol = ClickProtocol(clicks=tuple(cfg.clicks), multimask_first=cfg.multimask_first,
                             use_prev_mask=cfg.use_prev_mask)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("validate")
    loader = dm.val_dataloader()
    if loader is None:
        raise ValueError("data: this datamodule has no validation split (set its val_* keys)")
    per_mask = {"iou": {k: [] for k in protocol.clicks}, "iou_oracle": {k: [] for k in protocol.clicks}}
    t0, images = time.time(), 0
    for i, batch in enumerate(loader):
        if cfg.max_batches is not None and i >= cfg.max_batches:
            break
        batch = dm.on_before_batch_transfer(batch, 0)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        res = interactive_eval(model, batch, protocol)
        for key in per_mask:
            for k in protocol.clicks:
                per_mask[key][k] += res[key][k]
        images += batch["image"].shape[0]
    metrics = summarize(per_mask)
    metrics.update({"num_images": images, "model": what, "seconds": round(time.time() - t0, 1),
                    "data": OmegaConf.select(cfg, "data._target_"), "protocol": {"clicks": list(protocol.clicks), "multimask_first": protocol.multimask_first,
                                 "use_prev_mask": protocol.use_prev_mask}})
    out_dir = cfg.output_dir or (os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(cfg.ckpt_path))), "eval")
                                 if cfg.ckpt_path and not cfg.ckpt_path.endswith(".pth")
                                 else os.path.join(cfg.paths.root_dir, "eval_untrained" if not cfg.ckpt_path else "eval"))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    log.info("%s", json.dumps({k: v for k, v in metrics.items() if k.startswith("miou")}))
    log.info("wrote %s", os.path.join(out_dir, "metrics.json"))
    return metrics


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
