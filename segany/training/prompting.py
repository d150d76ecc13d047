"""Simulated interactive prompting (SAM paper, appendix A "Training algorithm").

Per mask, ``num_rounds`` predictions (11 by default):

  round 0      a foreground point uniform in the GT mask, or the GT box with noise
               (std 10% of the side, capped at 20 px; paper), 50/50; or, for a share
               ``p_text`` of the masks that have one, the CLIP embedding of a crop around the
               mask as a text token (paper §7.5, appendix D.5: text-to-mask);
  point rounds one new point in the error region of the previous prediction (false negative
               -> positive label 1, false positive -> negative label 0): uniform over it
               (``click_rule="uniform"``, paper and SAM 2), or uniform over the interior of the
               larger error region (``"interior"``, RITM's training clicker); a prediction
               without error gets a negative point in the background (SAM 2's rule), so every
               row keeps the same token layout as at inference;
  mask rounds  no new point; only the previous logits as the mask prompt. One at a random
               position among the point rounds, one last.

HQ-SAM's prompts (Ke et al. 2023, its train/train.py; ``experiment=hq_sam``): round 0 is a box,
``init_points`` = 10 positive points uniform in the mask, or the GT mask with noise on its
boundary region as the only prompt (``p_mask``), one third each; ``hq_output`` says which output
of an HQ-SAM model the loss sees.

From round 1 on, the previous round's unthresholded low-res logits (of the mask with the
highest predicted IoU) are the mask prompt.

Everything here is pure tensor code on the tensors' device, vectorised over all rows
(rows = masks of all images, ``R = B * N``); nothing loops over masks or images.

Tokens (`Prompts.tokens`): the release's layout from `segany.modeling.prompt_encoder.prompt_tokens`,
the function the predictor and the evaluation use: a point row after k clicks is
[p, c1..ck, PAD], a box row [c1..ck, TL, BR], a text row [T, c1..ck, PAD] (all k + 2 tokens,
so the rows of one round stack; the text row is a point row whose first token is the text).
Coordinates are (x, y) pixels of the padded input frame; labels -1 pad, 0 negative,
1 positive, 2 box top-left, 3 box bottom-right.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from segany.modeling.constants import NEG, PAD, POS, TEXT
from segany.modeling.prompt_encoder import prompt_tokens

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
    box_noise_frac: float = 0.1  # box noise scale as a fraction of the box side
    box_noise_max: float = 20.0  # cap on that scale, pixels of the input frame
    box_noise: str = "gaussian"  # "gaussian": std = the scale (paper); "uniform": within +-scale (SAM 2)
    multimask: bool = True  # 3 outputs (min-loss) while the prompt is a single point
    feed_back_mask: bool = True  # previous logits as mask prompt from round 1
    detach_feedback: bool = True
    resolution: str = "full"  # targets, IoU targets and clicks at "full" S (SAM 2) or "low" S/4
    ignore_padding: bool = False  # loss, IoU targets and clicks inside the image only (as evaluation)
    checkpoint_rounds: bool = False
    mask_chunk: Optional[int] = None
    p_text: float = 0.0  # round 0: share of the masks with a CLIP embedding prompted by it (text-to-mask)
    click_rule: str = "uniform"  # corrective clicks: "uniform" over the error region (paper, SAM 2) |
    # "interior": uniform over the inner half of the larger error region (RITM); see error_points
    click_max_dist: int = 32  # "interior": distances are counted up to this many pixels (the loop's bound)
    later_round_weight: float = 1.0  # loss weight of each round after round 0 (1: every round alike, as SAM 2 sums)
    init_points: int = 1  # round 0 point rows: this many positive points, uniform in the mask without replacement
    # (1: the paper; HQ-SAM: 10); with more than 1 the point rows are not ambiguous (no multimask)
    p_mask: float = 0.0  # round 0: share of the rows prompted by the noisy GT mask alone (HQ-SAM: 1/3), before p_box
    mask_prompt_value: float = 255.0  # the mask prompt's foreground value (HQ-SAM feeds its 0/255 masks as logits)
    hq_output: str = "hq"  # HQ-SAM models: the output the loss sees and that is fed back: "hq" (the HQ token's
    # mask alone, HQ-SAM's training) | "sum" (SAM's + HQ's, the release predictor's default output)

    def __post_init__(self):
        def bad(key, why):
            raise ValueError(f"prompting.{key}={getattr(self, key)!r}: {why}")

        if self.point_rounds < 0:
            bad("point_rounds", "must be >= 0")
        if self.mask_rounds < 0:
            bad("mask_rounds", "must be >= 0")
        if not 0.0 <= self.p_box <= 1.0:
            bad("p_box", "a probability in [0, 1]")
        if not 0.0 <= self.p_text <= 1.0:
            bad("p_text", "a probability in [0, 1]")
        if self.box_noise_frac < 0 or self.box_noise_max < 0:
            bad("box_noise_frac", "box noise must be >= 0 (box_noise_max too)")
        if self.resolution not in ("low", "full"):
            bad("resolution", "'low' (S/4) or 'full' (S)")
        if self.box_noise not in ("gaussian", "uniform"):
            bad("box_noise", "'gaussian' (paper) or 'uniform' (SAM 2)")
        if self.mask_chunk is not None and self.mask_chunk < 1:
            bad("mask_chunk", "None or >= 1")
        if self.click_rule not in ("uniform", "interior"):
            bad("click_rule", "'uniform' (paper, SAM 2) or 'interior' (RITM)")
        if self.later_round_weight < 0:
            bad("later_round_weight", "must be >= 0")
        if self.click_max_dist < 1:
            bad("click_max_dist", "must be >= 1")
        if self.init_points < 1:
            bad("init_points", "must be >= 1")
        if not 0.0 <= self.p_mask <= 1.0:
            bad("p_mask", "a probability in [0, 1]")
        if self.hq_output not in ("hq", "sum"):
            bad("hq_output", "'hq' (the HQ token's mask, HQ-SAM's training) or 'sum' (SAM's + HQ's)")

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


def sample_uniform_k(region: Tensor, k: int, generator: Optional[torch.Generator] = None):
    """k distinct pixels uniformly at random from each row's region (without replacement: the
    k largest of uniform noise restricted to it). region (R, H, W) bool -> yx (R, k, 2) long,
    found (R, k) bool (False for the draws a region smaller than k cannot give; found ones first)."""
    R, H, W = region.shape
    u = torch.rand(region.shape, device=region.device, generator=generator)
    u = u.masked_fill_(~region, -1.0)
    val, flat = u.view(R, H * W).topk(k, dim=1)  # (R, k)
    return torch.stack((flat // W, flat % W), dim=2), val >= 0


def noisy_mask_prompt(masks: Tensor, size: int, value: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """HQ-SAM's mask prompt (its train/utils/misc.py ``masks_noise``): the GT at the decoder's mask
    input size, with N(0, 1) noise added in its "incoherent" region (where the mask differs from
    itself downsampled 8x and upsampled back, i.e. near its boundary), thresholded at 0.5.
    masks (R, S, S) bool -> (R, 1, size, size) float in {0, value} (HQ-SAM: 0 / 255, fed as logits)."""
    m = F.interpolate(masks[:, None].float(), (size, size), mode="bilinear", align_corners=False)  # (R, 1, s, s)
    small = F.interpolate(m, (size // 8, size // 8), mode="bilinear", align_corners=False)
    incoherent = (m - F.interpolate(small, (size, size), mode="bilinear", align_corners=False)).abs() >= 0.01
    noise = torch.randn(m.shape, device=m.device, generator=generator)
    return ((m + noise * incoherent) > 0.5).float() * value


def pixel_to_input(yx: Tensor, res: int, img_size: int) -> Tensor:
    """(R, 2) pixel indices (y, x) of a res x res grid -> (R, 2) float (x, y) in the input
    frame of img_size; pixel centres map to centres (identity when res == img_size)."""
    s = img_size / res
    return (yx.flip(-1).float() + 0.5) * s - 0.5


def noisy_boxes(
    boxes: Tensor,
    frac: float,
    max_std: float,
    size_hw: Tensor,
    law: str = "gaussian",
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """(R, 4) xyxy -> (R, 4) xyxy, each coordinate moved by noise of scale s = min(frac * side,
    max_std) (side = width for x, height for y): N(0, s^2) for ``law="gaussian"`` (the paper:
    "standard deviation equal to 10% of the box sidelength, to a maximum of 20 pixels"), uniform
    in [-s, s] for ``"uniform"`` (SAM 2's ``sample_box_points``). Clamped to the image,
    size_hw (R, 2) = (h, w) of its content in the input frame (not the padding), and re-ordered
    so that x1 <= x2, y1 <= y2."""
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0)  # (R, 2)
    scale = (frac * wh).clamp(max=max_std).repeat(1, 2)  # (R, 4)
    if law == "gaussian":
        noise = torch.randn(boxes.shape, device=boxes.device, generator=generator, dtype=boxes.dtype)
    else:
        noise = 2 * torch.rand(boxes.shape, device=boxes.device, generator=generator, dtype=boxes.dtype) - 1
    hi_xy = (size_hw.flip(-1).to(boxes.dtype) - 1).repeat(1, 2)  # (R, 4) w-1, h-1, w-1, h-1
    out = torch.minimum((boxes + noise * scale).clamp(min=0), hi_xy)
    lo = torch.minimum(out[:, :2], out[:, 2:])
    hi = torch.maximum(out[:, :2], out[:, 2:])
    return torch.cat((lo, hi), dim=1)


@dataclass
class Prompts:
    """The prompts of R rows so far: round 0's point (point rows) or box (box rows), then the
    corrective clicks. ``tokens()`` lays them out as the predictor would send them."""

    point: Tensor  # (R, k, 2) round-0 points (k = init_points), (x, y) input frame (unused in box rows)
    point_label: Tensor  # (R, k) POS, PAD for the draws a small mask cannot give, all PAD in invalid rows
    box: Tensor  # (R, 4) noisy GT box xyxy (unused in point rows)
    is_box: Tensor  # (R,) bool
    clicks: Tensor  # (R, k, 2) corrective clicks
    click_labels: Tensor  # (R, k) POS / NEG, PAD in invalid rows
    text: Optional[Tensor] = None  # (R, D) CLIP embeddings (None: no text prompt at all)
    is_text: Optional[Tensor] = None  # (R,) bool: round 0 is the text token (a point row otherwise)
    is_mask: Optional[Tensor] = None  # (R,) bool: round 0 is the noisy GT mask alone (a point row of PAD tokens)
    mask: Optional[Tensor] = None  # (R, 1, 4h, 4w) that mask prompt (noisy_mask_prompt)

    def add(self, coords: Tensor, labels: Tensor) -> None:
        """Append one click per row: coords (R, 1, 2), labels (R, 1)."""
        self.clicks = torch.cat((self.clicks, coords), 1)
        self.click_labels = torch.cat((self.click_labels, labels), 1)

    @property
    def single_point(self) -> bool:
        """Round 0 and no click yet: an ambiguous prompt in the point rows (multimask)."""
        return self.clicks.shape[1] == 0

    @property
    def ambiguous(self) -> Tensor:
        """(R,) bool: the rows whose round-0 prompt is a single point (answered with 3 masks)."""
        out = ~self.is_box if self.point.shape[1] == 1 else torch.zeros_like(self.is_box)
        return out if self.is_mask is None else out & ~self.is_mask

    def tokens(self) -> tuple:
        """-> coords (R, k + 2, 2), labels (R, k + 2) [, text (R, D)]: point rows [p, c1..ck, PAD],
        box rows [c1..ck, TL, BR], text rows [T, c1..ck, PAD]
        (segany.modeling.prompt_encoder.prompt_tokens); invalid rows all PAD."""
        clicks = (self.clicks, self.click_labels)
        pts = prompt_tokens((torch.cat((self.point, clicks[0]), 1), torch.cat((self.point_label, clicks[1]), 1)), None)
        box = prompt_tokens(clicks if self.clicks.shape[1] else None, self.box)
        if box[0].shape[1] < pts[0].shape[1]:  # k > 1 round-0 points: box rows padded to the point rows' length
            extra = pts[0].shape[1] - box[0].shape[1]
            box = (F.pad(box[0], (0, 0, 0, extra)), F.pad(box[1], (0, extra), value=PAD))
        coords = torch.where(self.is_box[:, None, None], box[0], pts[0])
        labels = torch.where(self.is_box[:, None], box[1], pts[1])
        if self.text is not None:
            txt = prompt_tokens(clicks if self.clicks.shape[1] else None, None, self.text)
            coords = torch.where(self.is_text[:, None, None], txt[0], coords)
            labels = torch.where(self.is_text[:, None], txt[1], labels)
        invalid = self.point_label[:, 0] == PAD
        if self.is_mask is not None:  # mask rows have PAD points but are valid
            invalid = invalid & ~self.is_mask
        labels = labels.masked_fill(invalid[:, None], PAD)
        if self.text is None or not bool((labels == TEXT).any()):
            return coords, labels
        return coords, labels, self.text


def initial_prompts(
    masks: Tensor,
    boxes: Tensor,
    valid: Tensor,
    size_hw: Tensor,
    cfg: PromptConfig,
    generator: Optional[torch.Generator] = None,
    text: Optional[Tensor] = None,
    has_text: Optional[Tensor] = None,
) -> Prompts:
    """Round 0. masks (R, S, S) bool GT in the input frame, boxes (R, 4) xyxy, valid (R,),
    size_hw (R, 2) the image content's (h, w) in the input frame (box noise stays inside it),
    text (R, D) CLIP embeddings where has_text (R,) (or None).
    The point is uniform over the full-resolution GT mask; a row that is invalid (padding), or
    a point row whose mask is empty, gets only PAD tokens. A share cfg.p_text of the rows with
    an embedding start from it (a text row), the others from a box (p_box) or a point."""
    R, S, _ = masks.shape
    dev = masks.device
    is_box = torch.rand(R, device=dev, generator=generator) < cfg.p_box
    if cfg.init_points == 1:
        yx, found = sample_uniform(masks, generator)
        yx, found = yx[:, None], found[:, None]  # (R, 1, 2), (R, 1)
    else:
        yx, found = sample_uniform_k(masks, cfg.init_points, generator)  # (R, k, 2), (R, k)
    point = pixel_to_input(yx.flatten(0, 1), S, S).view(R, -1, 2)  # (R, k, 2)
    box = noisy_boxes(boxes.float(), cfg.box_noise_frac, cfg.box_noise_max, size_hw, cfg.box_noise, generator)
    is_text = is_mask = mask = None
    if text is not None and cfg.p_text > 0:
        is_text = (torch.rand(R, device=dev, generator=generator) < cfg.p_text) & has_text
        is_box = is_box & ~is_text
    else:
        text = None
    if cfg.p_mask > 0:  # drawn first: the other rows split into boxes and points by p_box
        is_mask = (torch.rand(R, device=dev, generator=generator) < cfg.p_mask) & valid
        if is_text is not None:
            is_mask = is_mask & ~is_text
        is_box = is_box & ~is_mask
        mask = noisy_mask_prompt(masks, S // 4, cfg.mask_prompt_value, generator)
    ok = valid & (is_box | found[:, 0] | (is_text if is_text is not None else False))
    label = torch.full(found.shape, POS, device=dev, dtype=torch.long)
    label = label.masked_fill(~ok[:, None] | ~(found | is_box[:, None]), PAD)
    if is_mask is not None:
        label = label.masked_fill(is_mask[:, None], PAD)  # the mask alone: no point tokens
    clicks = (point.new_zeros(R, 0, 2), label.new_zeros(R, 0))
    return Prompts(point, label, box, is_box, *clicks, text, is_text, is_mask, mask)


def chessboard_distance(region: Tensor, max_dist: int) -> Tensor:
    """(R, H, W) bool -> (R, H, W) float: each region pixel's chessboard (L-inf) distance to the
    nearest pixel outside the region or the image (1 on its boundary, 0 outside), counted up to
    max_dist. Repeated 3x3 erosions (separable: a row AND then a column AND of the neighbours, on
    bool tensors), vectorised over rows and on the tensors' device: an exact Euclidean transform
    (RITM's cv2.distanceTransform) has no batched torch op; the L-inf distance is within a factor
    sqrt(2) of it, enough to tell a region's interior from its boundary slivers."""
    x = region.clone()
    d = x.to(torch.int16)
    for _ in range(max_dist - 1):
        if not bool(x.any()):
            break
        y = x.clone()  # erosion; the image border counts as outside
        y[:, :, 1:] &= x[:, :, :-1]
        y[:, :, :-1] &= x[:, :, 1:]
        y[:, :, 0] = y[:, :, -1] = False
        x = y.clone()
        x[:, 1:] &= y[:, :-1]
        x[:, :-1] &= y[:, 1:]
        x[:, 0] = x[:, -1] = False
        d += x
    return d.float()


def error_points(
    pred: Tensor,
    gt: Tensor,
    valid: Tensor,
    img_size: int,
    region: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    rule: str = "uniform",
    max_dist: int = 32,
):
    """One corrective click per row in the error region.

    pred, gt (R, H, W) bool at the click resolution; valid (R,); region (R, H, W) bool, where
    clicks may fall (the image content; None: everywhere).
    rule "uniform": uniform over the error region (the paper: "uniformly from the error region";
    SAM 2's ``sample_random_points_from_errors``). rule "interior": RITM's training clicker
    (isegm ``get_next_points``): the error kind whose region reaches deeper (max distance to its
    boundary, here chessboard_distance up to max_dist) is clicked, uniformly among its pixels
    deeper than half that maximum; clicks then avoid the 1-2 px slivers along a boundary.
    Returns coords (R, 1, 2) float in the input frame and labels (R, 1) long: POS where the
    pixel is a false negative, NEG where a false positive. A row without error gets a NEG click
    uniform in the background (or a POS one in the mask when there is no background): SAM 2's
    rule, which keeps every row's token count.
    Invalid rows get PAD. The label is the GT at the clicked pixel.
    """
    if region is not None:
        pred, gt = pred & region, gt & region
    bg = ~gt if region is None else region & ~gt
    err = gt ^ pred
    R = gt.shape[0]
    has = lambda m: m.view(R, -1).any(dim=1)[:, None, None]  # noqa: E731
    if rule == "interior":
        d_fn = chessboard_distance(gt & ~pred, max_dist)
        d_fp = chessboard_distance(pred & ~gt, max_dist)
        m_fn, m_fp = d_fn.amax((1, 2)), d_fp.amax((1, 2))  # (R,)
        d = torch.where((m_fn > m_fp)[:, None, None], d_fn, d_fp)  # RITM: positive iff fn reaches strictly deeper
        err = d > torch.maximum(m_fn, m_fp)[:, None, None] / 2
    elif rule != "uniform":
        raise ValueError(f"click rule {rule!r}: 'uniform' or 'interior'")
    cand = torch.where(has(err), err, torch.where(has(bg), bg, gt))
    yx, found = sample_uniform(cand, generator)
    H, W = gt.shape[-2:]
    on_gt = gt.view(R, -1).gather(1, (yx[:, 0] * W + yx[:, 1])[:, None]).squeeze(1)
    labels = torch.where(on_gt, POS, NEG).masked_fill(~(found & valid), PAD)
    return pixel_to_input(yx, H, img_size)[:, None], labels[:, None]
