"""benchmarks/finetune_vs_hf.py: its written-out MONAI DiceCE loss against hand-computed values, and
its one-round segany configuration giving the decoder exactly the boxes the HF arm gets."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch

from segany.modeling.constants import BOX_BR, BOX_TL
from segany.training.prompting import INIT, PromptConfig, initial_prompts, round_schedule

spec = importlib.util.spec_from_file_location(
    "finetune_vs_hf", Path(__file__).resolve().parents[1] / "benchmarks" / "finetune_vs_hf.py"
)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_dice_ce_hand_values():
    # sample 0: logits 0 (p = 1/2) on 4 pixels, one in the target:
    #   dice = 1 - (2 * 1/2 + 1e-5) / (4 * 1/4 + 1 + 1e-5), BCE = ln 2 per pixel
    # sample 1: logit ln 3 (p = 3/4) on the one target pixel, -ln 3 (p = 1/4) elsewhere:
    #   dice = 1 - (2 * 3/4 + 1e-5) / (9/16 + 3 / 16 + 1 + 1e-5), BCE = ln(4/3) per pixel
    l3 = math.log(3)
    logits = torch.tensor([[[[0.0, 0.0], [0.0, 0.0]]], [[[l3, -l3], [-l3, -l3]]]])  # (2, 1, 2, 2)
    target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]]).expand(2, 1, 2, 2)
    e = 1e-5
    dice0 = 1 - (1 + e) / (2 + e)
    dice1 = 1 - (1.5 + e) / (12 / 16 + 1 + e)
    bce = (math.log(2) + math.log(4 / 3)) / 2
    want = (dice0 + dice1) / 2 + bce
    assert abs(bench.dice_ce(logits, target).item() - want) < 1e-6


def test_one_box_round_prompts_are_the_boxes():
    masks = torch.zeros(1, 2, 64, 64, dtype=torch.bool)
    masks[0, 0, 10:20, 5:30] = True
    masks[0, 1, 40:64, 33:50] = True  # touches the bottom edge: y1 = 64, one past the last row
    boxes = bench.mask_boxes(masks)
    assert boxes.tolist() == [[[5.0, 10.0, 30.0, 20.0], [33.0, 40.0, 50.0, 64.0]]]
    cfg = PromptConfig(**bench.ONE_BOX_ROUND)
    assert round_schedule(cfg) == [INIT]
    p = initial_prompts(masks[0], boxes[0], torch.ones(2, dtype=torch.bool), torch.tensor([[64, 64]] * 2), cfg)
    assert p.is_box.all()
    coords, labels = p.tokens()
    assert labels.tolist() == [[BOX_TL, BOX_BR]] * 2
    # no noise; the edge box is clamped to the last pixel (63) inside the image
    assert coords.reshape(2, 4).tolist() == [[5.0, 10.0, 30.0, 20.0], [33.0, 40.0, 50.0, 63.0]]
