"""Evaluate a checkpoint on the zero-shot tasks of the SAM paper (segany/evaluation):

    task=points     interactive single-point mIoU at 1, 2, 3, 5, 9 clicks (default and oracle)
    task=proposals  the mask generator as object proposals: mask AR@10/100/1000 (COCOeval)
    task=instances  masks from a detector's boxes + one refinement pass: mask AP (COCOeval)
    task=edges      edge maps from a 16x16 point grid: ODS / OIS / AP / R50 (the BSDS500 benchmark)
    task=all        the five: points, noc (RITM's NoC@85/90, mIoU@1..20), proposals, instances, edges

each on one dataset (`data=...`; only its validation split is read) or a list (`datasets`,
name -> datamodule config), per dataset and averaged; writes metrics.json, results.md and plots
to output_dir, by default a folder named after the checkpoint and the data, so that evaluations
of one checkpoint on different data never overwrite each other:

    <run dir>/eval/<ckpt stem>-<data>        train.py checkpoint: runs/demo/eval/last-synthetic/
    <paths.root_dir>/eval/<ckpt stem>-<data> official .pth: runs/eval/sam_vit_b_01ec64-coco-instances_val2017/
    <paths.root_dir>/eval/untrained-<data>   no checkpoint

(<data>: the `datasets` names joined by +, or data's name and the stem of its validation file:
coco-instances_val2017, coco-lvis_v1_val). Logs to wandb with wandb.enabled=true. Sharded:
launch N ranks (torchrun / srun, or rank=i world_size=N), each evaluates its share, rank 0 merges.

    python evaluate.py checkpoint=runs/demo/checkpoints/last.ckpt      # points on held-out synthetic scenes
    python evaluate.py checkpoint=runs/demo/checkpoints/last.ckpt task=all
    python evaluate.py                                                  # untrained vit_tiny baseline
    python evaluate.py checkpoint=sam_vit_b_01ec64.pth model=vit_b data=coco data.val_annotations=COCO_DIR/val.json
    python evaluate.py sweep_dir=runs/lr_sweep                          # every run of a sweep -> results.md
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from segany.utils.cli import check_overrides
from segany.utils.config import register_resolvers

log = logging.getLogger("evaluate")
register_resolvers()


def evaluate(cfg: DictConfig) -> dict:
    if cfg.get("sweep_dir"):
        from segany.evaluation.sweep import evaluate_sweep

        return evaluate_sweep(cfg)
    from segany.evaluation.runner import evaluate as run

    return run(cfg)


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    check_overrides(sys.argv[1:])  # before Hydra: a key given twice (shell-expanded braces) is an error
    main()
