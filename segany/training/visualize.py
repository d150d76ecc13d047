"""Validation figures: predicted masks drawn over the input image; mean IoU per prompting round."""

from __future__ import annotations

import colorsys

import cv2
import numpy as np
import torch

from segany.modeling.constants import PIXEL_MEAN, PIXEL_STD


def draw_masks(batch: dict, pred: torch.Tensor, clicks: torch.Tensor, max_images: int = 4, alpha: float = 0.5):
    """batch (contract format), pred (B, N, S, S) bool, clicks (B, N, 2) (x, y) -> list of
    (h, w, 3) uint8 RGB: each valid mask's prediction in its own colour, its click as a dot,
    the GT outline in white."""
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(3, 1, 1)
    out = []
    for b in range(min(max_images, pred.shape[0])):
        h, w = (int(x) for x in batch["input_size"][b])
        img = (batch["image"][b].detach().float().cpu() * std + mean).clamp(0, 255)
        img = np.ascontiguousarray(img.permute(1, 2, 0).numpy()[:h, :w], dtype=np.float32)  # OpenCV needs contiguous
        valid = batch["valid"][b].cpu().numpy()
        n_valid = max(int(valid.sum()), 1)
        for j in np.nonzero(valid)[0]:
            colour = np.array(colorsys.hsv_to_rgb(j / n_valid, 0.9, 1.0)) * 255
            m = pred[b, j, :h, :w].cpu().numpy()
            img[m] = (1 - alpha) * img[m] + alpha * colour
            gt = batch["masks"][b, j, :h, :w].cpu().numpy().astype(np.uint8)
            contours, _ = cv2.findContours(gt, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(img, contours, -1, (255, 255, 255), 1)
            x, y = (int(round(float(v))) for v in clicks[b, j].cpu())
            cv2.circle(img, (x, y), 3, tuple(float(c) for c in colour), -1)
            cv2.circle(img, (x, y), 3, (0, 0, 0), 1)
        out.append(np.ascontiguousarray(img.astype(np.uint8)))
    return out


def plot_rounds(path: str, kinds, val_iou, train_iou=None, val_loss=None, title: str = ""):
    """Mean IoU against the prompting round, saved as a png at path; -> the Figure.
    kinds: a tick label per round (e.g. "init", "pt", "mask"); val_iou, train_iou (optional),
    val_loss (optional, on a second axis): a value per round. Matplotlib's object API with
    no pyplot: no global figure state and no backend switch in the training process."""
    from matplotlib.figure import Figure

    x = list(range(len(val_iou)))
    fig = Figure(figsize=(max(5.0, 0.45 * len(x) + 1.5), 3.6))
    ax = fig.subplots()
    lines = ax.plot(x, list(val_iou), marker="o", label="val IoU")
    if train_iou is not None:
        lines += ax.plot(x, list(train_iou), marker="s", ls="--", label="train IoU (since last val)")
    ax.set_xticks(x, list(kinds), fontsize=8)
    ax.set_xlabel("round")
    ax.set_ylabel("mean IoU")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    if val_loss is not None:
        ax2 = ax.twinx()
        lines += ax2.plot(x, list(val_loss), color="gray", ls=":", marker=".", label="val loss")
        ax2.set_ylabel("loss")
    ax.set_title(title, fontsize=9, loc="right")
    fig.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="upper left", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.88))  # the legend above the axes
    fig.savefig(path, dpi=100)
    return fig
