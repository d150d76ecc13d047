"""Simulated interactive prompting (SAM paper, appendix A "Training algorithm").

Per mask, ``num_rounds`` predictions (11 by default):

  round 0      a foreground point uniform in the GT mask, or the GT box with noise
               (std 10% of the side, capped at 20 px), 50/50;
  point rounds one new point uniform in the error region of the previous prediction
               (false negative -> positive label 1, false positive -> negative label 0);
  mask rounds  no new point; only the previous logits as the mask prompt. One at a random
               position among the point rounds, one last.

From round 1 on, the previous round's unthresholded low-res logits (of the mask with the
highest predicted IoU) are the mask prompt.

Everything here is pure tensor code on the tensors' device, vectorised over all rows
(rows = masks of all images, ``R = B * N``); nothing loops over masks or images.

Point encoding (docs/contracts.md): coords (R, P, 2) as (x, y) pixels in the padded input
frame, labels (R, P) long: -1 pad, 0 negative, 1 positive, 2 box top-left, 3 box
bottom-right. A box is therefore two "points", so every round is one prompt-encoder call
with ``boxes=None``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import Tensor

from segany.modeling.constants import BOX_BR, BOX_TL, NEG, PAD, POS

INIT, POINT, MASK = "init", "point", "mask"


@dataclass
class PromptConfig:
    """Every number of the simulation (the ablations change them).

    Memory knobs (see experiments/README.md, "Memory"):
      checkpoint_rounds  recompute each round (per mask chunk) in backward instead of
                         storing its activations (torch.utils.checkpoint);
      mask_chunk         masks per image per checkpointed unit (B x mask_chunk rows of the
                         valid masks; None = all); only lowers memory together with
                         checkpoint_rounds;
      detach_feedback    stop gradients through the logits fed back as mask prompt.
    """

    point_rounds: int = 8  # rounds adding one error point after round 0
    mask_rounds: int = 2  # rounds with no new point (mask prompt only); with no point
    # rounds they follow round 0 back to back
    mask_round_last: bool = True  # one mask round is the last round; the others random
    p_box: float = 0.5  # round 0: probability of the noisy GT box (else a point)
    box_noise_frac: float = 0.1  # box noise std as a fraction of the box side
    box_noise_max: float = 20.0  # cap on that std, pixels of the input frame
    multimask: bool = True  # 3 outputs (min-loss) while the prompt is a single point
    feed_back_mask: bool = True  # previous logits as mask prompt from round 1
    detach_feedback: bool = True
    resolution: str = "low"  # "low" (S/4, the decoder's) or "full" (S, as SAM 2)
    checkpoint_rounds: bool = False
    mask_chunk: Optional[int] = None

    def __post_init__(self):
        def bad(key, why):
            raise ValueError(f"prompting.{key}={getattr(self, key)!r}: {why}")

        if self.point_rounds < 0:
            bad("point_rounds", "must be >= 0")
        if self.mask_rounds < 0:
            bad("mask_rounds", "must be >= 0")
        if not 0.0 <= self.p_box <= 1.0:
            bad("p_box", "a probability in [0, 1]")
        if self.box_noise_frac < 0 or self.box_noise_max < 0:
            bad("box_noise_frac", "box noise must be >= 0 (box_noise_max too)")
        if self.resolution not in ("low", "full"):
            bad("resolution", "'low' (S/4) or 'full' (S)")
        if self.mask_chunk is not None and self.mask_chunk < 1:
            bad("mask_chunk", "None or >= 1")

    @property
    def num_rounds(self) -> int:
        return 1 + self.point_rounds + self.mask_rounds


def round_schedule(cfg: PromptConfig, generator: Optional[torch.Generator] = None) -> List[str]:
    """The kinds of the ``cfg.num_rounds`` rounds, e.g. for the default 11:
    ``[init, point, point, mask, point, ..., point, mask]``: one mask round last (if
    ``mask_round_last``), the others each inserted before a uniformly drawn point round.
    Shared by all masks of a step (it is the same program for every row)."""
    rounds = [POINT] * cfg.point_rounds
    n_random = cfg.mask_rounds - int(cfg.mask_round_last and cfg.mask_rounds > 0)
    for _ in range(n_random):
        slots = max(cfg.point_rounds, 1)
        k = int(torch.randint(slots, (1,), generator=generator))
        # insert before the k-th point round (counting only point rounds)
        pos = [i for i, r in enumerate(rounds) if r == POINT][k] if cfg.point_rounds else 0
        rounds.insert(pos, MASK)
    if cfg.mask_round_last and cfg.mask_rounds > 0:
        rounds.append(MASK)
    return [INIT] + rounds


def sample_uniform(region: Tensor, generator: Optional[torch.Generator] = None):
    """One pixel uniformly at random from each row's region.

    region (R, H, W) bool -> yx (R, 2) long, found (R,) bool (False where the region is
    empty; yx is then arbitrary). Argmax of uniform noise restricted to the region: every
    region pixel is equally likely to hold the maximum.
    """
    R, H, W = region.shape
    u = torch.rand(region.shape, device=region.device, generator=generator)
    u = u.masked_fill_(~region, -1.0)
    flat = u.view(R, H * W).argmax(dim=1)  # (R,)
    found = region.view(R, H * W).any(dim=1)
    return torch.stack((flat // W, flat % W), dim=1), found


def pixel_to_input(yx: Tensor, res: int, img_size: int) -> Tensor:
    """(R, 2) pixel indices (y, x) of a res x res grid -> (R, 2) float (x, y) in the input
    frame of img_size; pixel centres map to centres (identity when res == img_size)."""
    s = img_size / res
    return (yx.flip(-1).float() + 0.5) * s - 0.5


def noisy_boxes(
    boxes: Tensor, frac: float, max_std: float, img_size: int, generator: Optional[torch.Generator] = None
) -> Tensor:
    """(R, 4) xyxy -> (R, 4) xyxy, each coordinate + N(0, std^2) with std = min(frac * side,
    max_std) (side = width for x, height for y), clamped to [0, img_size - 1] and re-ordered
    so that x1 <= x2, y1 <= y2."""
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0)  # (R, 2)
    std = (frac * wh).clamp(max=max_std).repeat(1, 2)  # (R, 4)
    noise = torch.randn(boxes.shape, device=boxes.device, generator=generator, dtype=boxes.dtype)
    out = (boxes + noise * std).clamp(0, img_size - 1)
    lo = torch.minimum(out[:, :2], out[:, 2:])
    hi = torch.maximum(out[:, :2], out[:, 2:])
    return torch.cat((lo, hi), dim=1)


def initial_prompts(
    masks: Tensor, boxes: Tensor, valid: Tensor, cfg: PromptConfig, generator: Optional[torch.Generator] = None
):
    """Round 0. masks (R, S, S) bool GT in the input frame, boxes (R, 4) xyxy, valid (R,).

    Returns coords (R, 2, 2) float, labels (R, 2) long, is_box (R,) bool:
    a point row is [(p, POS), (0, PAD)], a box row [(tl, BOX_TL), (br, BOX_BR)], an invalid
    (padding) row all PAD. The point is uniform over the full-resolution GT mask.
    """
    R, S, _ = masks.shape
    dev = masks.device
    is_box = torch.rand(R, device=dev, generator=generator) < cfg.p_box
    yx, found = sample_uniform(masks, generator)
    point = pixel_to_input(yx, S, S)  # (R, 2)
    point_rows = torch.stack((point, torch.zeros_like(point)), dim=1)  # (R, 2, 2)
    box_rows = noisy_boxes(boxes.float(), cfg.box_noise_frac, cfg.box_noise_max, S, generator).view(R, 2, 2)
    coords = torch.where(is_box[:, None, None], box_rows, point_rows)
    lab_box = torch.tensor([BOX_TL, BOX_BR], device=dev)
    lab_pt = torch.tensor([POS, PAD], device=dev)
    labels = torch.where(is_box[:, None], lab_box, lab_pt)  # (R, 2)
    ok = valid & (is_box | found)
    labels = labels.masked_fill(~ok[:, None], PAD)
    return coords, labels, is_box


def error_points(pred: Tensor, gt: Tensor, valid: Tensor, img_size: int, generator: Optional[torch.Generator] = None):
    """One corrective click per row, uniform over the error region.

    pred, gt (R, H, W) bool at the loss resolution; valid (R,).
    Returns coords (R, 1, 2) float in the input frame and labels (R, 1) long: POS where the
    pixel is a false negative, NEG where a false positive, PAD where the row is invalid or
    already has no error.
    """
    fn = gt & ~pred
    err = fn | (pred & ~gt)
    yx, found = sample_uniform(err, generator)
    H, W = gt.shape[-2:]
    is_fn = fn.view(fn.shape[0], -1).gather(1, (yx[:, 0] * W + yx[:, 1])[:, None]).squeeze(1)
    labels = torch.where(is_fn, POS, NEG)
    labels = labels.masked_fill(~(found & valid), PAD)
    return pixel_to_input(yx, H, img_size)[:, None], labels[:, None]
