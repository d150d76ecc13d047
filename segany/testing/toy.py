"""Toy batches in the datamodules' format (docs/contracts.md) for tests and benchmarks:
random axis-aligned ellipses on random images, no data needed."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def toy_batch(
    batch_size: int = 2,
    num_masks: int = 4,
    img_size: int = 256,
    num_valid: Optional[int] = None,
    device=None,
    generator: Optional[torch.Generator] = None,
) -> dict:
    """masks (B, N, S, S): ellipses with centres in the middle 60% and half-axes 5-25% of S;
    the first ``num_valid`` masks of each image valid (default all), the rest empty padding."""
    B, N, S = batch_size, num_masks, img_size
    g = generator
    num_valid = N if num_valid is None else num_valid
    c = (0.2 + 0.6 * torch.rand(B, N, 2, generator=g)) * S  # (B, N, 2) x, y
    ax = (0.05 + 0.2 * torch.rand(B, N, 2, generator=g)) * S
    yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    d = ((xx - c[..., 0, None, None]) / ax[..., 0, None, None]) ** 2 + (
        (yy - c[..., 1, None, None]) / ax[..., 1, None, None]
    ) ** 2
    valid = (torch.arange(N) < num_valid).expand(B, N).clone()
    masks = (d <= 1) & valid[..., None, None]  # (B, N, S, S)
    ys, xs = masks.any(-1), masks.any(-2)  # (B, N, S)
    ar = torch.arange(S)
    lo = lambda m: torch.where(m, ar, S).min(-1).values.float()
    hi = lambda m: torch.where(m, ar, -1).max(-1).values.float() + 1
    boxes = torch.stack((lo(xs), lo(ys), hi(xs), hi(ys)), -1) * valid[..., None]
    image = torch.randn(B, 3, S, S, generator=g)
    image = image + 2 * masks[:, :num_valid].float().sum(1, keepdim=True)  # masks visible in the image
    batch = {
        "image": image,
        "original_size": torch.full((B, 2), S, dtype=torch.long),
        "input_size": torch.full((B, 2), S, dtype=torch.long),
        "masks": masks,
        "masks_lowres": F.avg_pool2d(masks.float().flatten(0, 1)[:, None], 4).view(B, N, S // 4, S // 4) > 0.5,
        "valid": valid,
        "boxes": boxes,
        "mask_ids": torch.where(valid, torch.arange(N), -1),
        "image_id": [str(i) for i in range(B)],
        "faults": {},
    }
    if device is not None:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    return batch
