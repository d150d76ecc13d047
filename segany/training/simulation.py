"""The interactive training rounds: prompt -> decode -> loss -> next prompt, ``num_rounds``
times, for all masks of all images at once.

Rows are the valid (image, mask) pairs of the B x N batch, image-major. Padding rows (a
batch pads every image to its largest mask count) are left out before the decoder: they
would contribute nothing to the loss but cost as much compute as real masks (about a
quarter of the rows on the synthetic demo data, most on COCO). Each row is decoded against
its own image's embedding. The image encoder is not run here: the caller passes its
embeddings, computed once per image per step.

One *unit* = one round for one chunk of masks: prompt encoder + all four decoder mask
tokens + the loss. With ``checkpoint_rounds`` a unit stores only its inputs and is
recomputed in backward, so the stored activations are those of one unit instead of
rounds x masks of them. Prompt sampling happens between units, outside the graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from segany.evaluation.metrics import iou_from_counts
from segany.training.losses import SamLoss
from segany.training.prompting import POINT, PromptConfig, error_points, initial_prompts, round_schedule

MULTI_TOKENS = (1, 2, 3)  # multimask outputs; token 0 is the single-mask output


def loss_targets(batch: dict, resolution: str) -> Tensor:
    """GT masks at the loss resolution: (B, N, S, S) for "full", (B, N, S/4, S/4) for "low" (the
    datamodule's ``masks_lowres`` when present, else area-downsampled > 0.5, as the datamodules do)."""
    masks = batch["masks"]
    if resolution == "full":
        return masks
    if "masks_lowres" in batch:
        return batch["masks_lowres"]
    B, N, S, _ = masks.shape
    low = F.avg_pool2d(masks.view(B * N, 1, S, S).float(), 4) > 0.5
    return low.view(B, N, S // 4, S // 4)


def image_region(batch: dict, resolution: str) -> Tensor:
    """(B, H, W) bool at the loss resolution: the image content (``input_size``), without the
    zero padding below and right of it (at S/4: the cells the content overlaps)."""
    S = batch["masks"].shape[-1]
    H = S if resolution == "full" else S // 4
    hw = batch["input_size"].to(batch["masks"].device)
    hw = hw if resolution == "full" else (hw + 3) // 4  # ceil
    ar = torch.arange(H, device=hw.device)
    return (ar[None, :, None] < hw[:, 0, None, None]) & (ar[None, None, :] < hw[:, 1, None, None])


@dataclass
class Unit:
    """The inputs of one unit (one round for one chunk of R rows; see `_unit`).

    img (R,) the image of each row; coords (R, P, 2) and labels (R, P) laid out by Prompts.tokens;
    text (R, D) CLIP embeddings of its TEXT tokens or None; mask_in (R, 1, 4h, 4w) or None;
    target (R, H, W) bool at the loss resolution; region (B, H, W) bool where the loss counts
    (None: everywhere); valid (R,); multi_rows (R,) bool, the rows answered with the 3 multimask
    tokens (None: every row single-mask). An HQ-SAM model answers every row with one mask
    (``hq_output``; HQ-SAM trains single-mask)."""

    img: Tensor
    coords: Tensor
    labels: Tensor
    text: Optional[Tensor]
    mask_in: Optional[Tensor]
    target: Tensor
    region: Optional[Tensor]
    valid: Tensor
    multi_rows: Optional[Tensor]
    has_mask: Optional[Tensor] = None  # (R,) bool: the rows whose mask_in counts (None: all, when given)
    hq_output: str = "hq"  # HQ-SAM models: "hq" (the HQ token's mask) | "sum" (SAM's token 0 + HQ's)


def _unit(model, loss_fn: SamLoss, emb: Tensor, pe: Tensor, u: Unit, hq_feat: Optional[Tensor] = None):
    """One round for one chunk of rows (the checkpointed function).

    emb (B, C, h, w) (channels-last: the decoder's image tokens are then contiguous rows, as is
    the dense prompt embedding; ``emb[u.img]`` keeps the layout) and pe (1, C, h, w) are arguments
    of their own: torch.utils.checkpoint finds the device (its random state, for dropout in
    the recomputation, and its autocast) from the tensors among its arguments, not inside `u`.
    hq_feat (B, C/8, 4h, 4w): an HQ-SAM model's per-image HQ features (MaskDecoderHQ.hq_features).
    Returns loss sum (scalar), fed-back logits (R, 1, 4h, 4w), binary prediction at the
    loss resolution (R, H, W), its IoU with the target (R,), per-row loss (R,).
    """
    tokens = (u.coords, u.labels) if u.text is None else (u.coords, u.labels, u.text)
    rows_with_mask = {} if u.has_mask is None else {"has_mask": u.has_mask}  # HQ-SAM's mask-prompt rows
    sparse, dense = model.prompt_encoder(points=None, boxes=None, masks=u.mask_in, tokens=tokens, **rows_with_mask)
    # each row's own image embedding, gathered inside the unit (recomputed, not stored, with
    # checkpoint_rounds: (R, C, h, w) is 64x an image's embedding)
    hq = {} if hq_feat is None else {"hq_features": hq_feat[u.img]}
    masks, iou = model.mask_decoder.predict_masks(emb[u.img], pe, sparse, dense, **hq)
    # masks (R, 4, 4h, 4w), iou (R, 4); HQ-SAM: masks (R, 5, ...), the HQ token's last
    if hq_feat is not None:  # one mask per row; the IoU is SAM's token 0's (HQ-SAM trains no IoU head)
        hq_mask = masks[:, 4:5]
        cand, cand_iou = (hq_mask if u.hq_output == "hq" else masks[:, :1] + hq_mask), iou[:, :1]
    elif u.multi_rows is None:
        cand, cand_iou = masks[:, :1], iou[:, :1]  # (R, 1, ...)
    else:  # multimask rows: tokens 1..3; single rows: token 0 three times (same min)
        idx = torch.where(
            u.multi_rows[:, None],
            torch.tensor(MULTI_TOKENS, device=masks.device),
            torch.zeros(3, dtype=torch.long, device=masks.device),
        )  # (R, 3)
        cand = masks.gather(1, idx[:, :, None, None].expand(-1, -1, *masks.shape[-2:]))  # (R, 3, 4h, 4w)
        cand_iou = iou.gather(1, idx)  # (R, 3)
    H, W = u.target.shape[-2:]
    logits = cand if cand.shape[-2:] == (H, W) else F.interpolate(cand, (H, W), mode="bilinear", align_corners=False)
    inside = None if u.region is None else u.region.index_select(0, u.img)  # (R, H, W)
    out = loss_fn(logits, cand_iou, u.target, u.valid, inside)
    # the mask with the highest predicted IoU is fed back and defines the error region
    top = cand_iou.detach().argmax(dim=1)  # (R,)
    rows = torch.arange(cand.shape[0], device=cand.device)
    feedback = cand[rows, top][:, None]  # (R, 1, 4h, 4w)
    pred = logits.detach()[rows, top] > 0  # (R, H, W)
    if inside is not None:
        pred &= inside
    # its IoU with the target, from the loss's pixel counts (1 when both are empty, as mask_iou)
    chosen_iou = iou_from_counts(out["inter"][rows, top], out["union"][rows, top], empty=1.0)
    return out["loss"].sum(), feedback, pred, chosen_iou, out["loss"].detach()


def simulate(
    model,
    embeddings: Tensor,
    batch: dict,
    cfg: PromptConfig,
    loss_fn: SamLoss,
    generator: Optional[torch.Generator] = None,
    schedule: Optional[list] = None,
    interm: Optional[Tensor] = None,
) -> dict:
    """Run all rounds on a batch. embeddings (B, 256, h, w) from the image encoder; an HQ-SAM
    model also needs interm (B, embed_dim, h, w), its early-block features (encode_image(.., True)).

    Returns {"loss": sum over rounds (after round 0 times cfg.later_round_weight) and valid masks
    (scalar, the caller normalises),
    "round_loss": (T,) summed per round, "round_iou": (T,) IoU of the highest-predicted-IoU
    mask summed over valid masks per round, "n_valid": number of valid masks, "schedule"}.
    """
    masks, boxes, valid = batch["masks"], batch["boxes"], batch["valid"]
    B, N, S, _ = masks.shape
    schedule = schedule or round_schedule(cfg, generator)
    target_all = loss_targets(batch, cfg.resolution)  # (B, N, H, W)
    region = image_region(batch, cfg.resolution) if cfg.ignore_padding else None  # (B, H, W)
    size_hw = batch["input_size"].to(masks.device)  # (B, 2)
    pe = model.prompt_encoder.get_dense_pe()
    emb_cl = embeddings.contiguous(memory_format=torch.channels_last)  # (B, C, h, w), see _unit
    hq_feat = None
    if getattr(model, "hq", False):  # per image, once per step: (B, C/8, 4h, 4w)
        if interm is None:
            raise ValueError("an HQ-SAM model (model.hq_token) needs its encoder's early features: simulate(interm=)")
        hq_feat = model.mask_decoder.hq_features(embeddings, interm)
    # the rows to decode: valid pairs only (all rows if none is valid, so that every rank
    # still runs the decoder and its gradient hooks fire; those rows add zero loss)
    rows = valid.reshape(-1).nonzero().squeeze(1)  # (R,) flat b*N + n
    if rows.numel() == 0:
        rows = torch.arange(B * N, device=masks.device)
    R_all = rows.numel()
    chunk = B * cfg.mask_chunk if cfg.mask_chunk else R_all  # rows per unit
    total = embeddings.new_zeros(())
    T = len(schedule)
    round_loss = torch.zeros(T, device=masks.device)
    round_iou = torch.zeros(T, device=masks.device)
    first_point = schedule.index(POINT) if POINT in schedule else T
    use_text = cfg.p_text > 0 and "clip" in batch
    if cfg.p_text > 0 and getattr(model.prompt_encoder, "text_embed_dim", 0) == 0:
        raise ValueError("prompting.p_text > 0 needs a model with the text token (model.text_embed_dim > 0)")

    for r0 in range(0, R_all, chunk):  # chunks of rows (all images together), not single masks
        idx = rows[r0 : r0 + chunk]  # (R,)
        img = idx // N  # (R,) image of each row
        gt = masks.reshape(B * N, S, S).index_select(0, idx)  # (R, S, S)
        target = target_all.reshape(B * N, *target_all.shape[-2:]).index_select(0, idx)
        v = valid.reshape(B * N).index_select(0, idx)  # (R,) all True unless none is
        text = has_text = None
        if use_text:
            text = batch["clip"].reshape(B * N, -1).index_select(0, idx).to(embeddings.dtype)  # (R, D)
            has_text = batch["has_clip"].reshape(B * N).index_select(0, idx)
        prompts = initial_prompts(
            gt,
            boxes.reshape(B * N, 4).index_select(0, idx),
            v,
            size_hw.index_select(0, img),
            cfg,
            generator,
            text,
            has_text,
        )
        multi = prompts.ambiguous if cfg.multimask and hq_feat is None else None
        mask_in, pred, has_mask = prompts.mask, None, prompts.is_mask  # round 0: HQ-SAM's noisy mask rows
        for t, kind in enumerate(schedule):
            if kind == POINT:
                where = None if region is None else region.index_select(0, img)
                prompts.add(*error_points(pred, target, v, S, where, generator, cfg.click_rule, cfg.click_max_dist))
            coords, labels, *txt = prompts.tokens()
            ambiguous = t < first_point  # still a single point (or a box)
            unit = Unit(
                img=img,
                coords=coords,
                labels=labels,
                text=txt[0] if txt else None,
                mask_in=mask_in,
                target=target,
                region=region,
                valid=v,
                multi_rows=multi if ambiguous else None,
                has_mask=has_mask,
                hq_output=cfg.hq_output,
            )
            if cfg.checkpoint_rounds and torch.is_grad_enabled():
                loss, fb, pred, iou, row_loss = checkpoint(
                    _unit, model, loss_fn, emb_cl, pe, unit, hq_feat, use_reentrant=False
                )
            else:
                loss, fb, pred, iou, row_loss = _unit(model, loss_fn, emb_cl, pe, unit, hq_feat)
            total = total + (loss if t == 0 else cfg.later_round_weight * loss)
            round_loss[t] += row_loss.sum()
            round_iou[t] += torch.where(v, iou, 0.0).sum()
            if cfg.feed_back_mask:
                mask_in, has_mask = (fb.detach() if cfg.detach_feedback else fb), None
    return {
        "loss": total,
        "round_loss": round_loss,
        "round_iou": round_iou,
        "n_valid": valid.sum(),
        "schedule": schedule,
    }
