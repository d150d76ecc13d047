"""Validation images: predicted masks drawn over the input image."""

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
