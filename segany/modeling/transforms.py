"""Resize so the longest side equals the model's input size, as the release does."""

from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> Tuple[int, int]:
    """(h, w) after scaling the longest side to `long_side_length`, rounded half up."""
    scale = long_side_length * 1.0 / max(oldh, oldw)
    return int(oldh * scale + 0.5), int(oldw * scale + 0.5)


class ResizeLongestSide:
    """Image, coordinate and box transforms for numpy (HWC uint8) and torch (BCHW) inputs."""

    def __init__(self, target_length: int) -> None:
        self.target_length = target_length

    get_preprocess_shape = staticmethod(get_preprocess_shape)

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> resized (h, w, 3) uint8, PIL bilinear like the release."""
        h, w = get_preprocess_shape(image.shape[0], image.shape[1], self.target_length)
        return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))

    def apply_coords(self, coords: np.ndarray, original_size: Tuple[int, ...]) -> np.ndarray:
        """(..., 2) (x, y) pixel coords in the original image -> the resized frame."""
        oldh, oldw = original_size
        h, w = get_preprocess_shape(oldh, oldw, self.target_length)
        coords = np.array(coords, dtype=float, copy=True)
        coords[..., 0] *= w / oldw
        coords[..., 1] *= h / oldh
        return coords

    def apply_boxes(self, boxes: np.ndarray, original_size: Tuple[int, ...]) -> np.ndarray:
        """(B, 4) xyxy -> the resized frame."""
        return self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_image_torch(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float -> resized (B, 3, h, w), bilinear with antialiasing.

        The release computes the size from (B, C) here, a bug; this uses (H, W)."""
        h, w = get_preprocess_shape(image.shape[2], image.shape[3], self.target_length)
        return F.interpolate(image, (h, w), mode="bilinear", align_corners=False, antialias=True)

    def apply_coords_torch(self, coords: torch.Tensor, original_size: Tuple[int, ...]) -> torch.Tensor:
        oldh, oldw = original_size
        h, w = get_preprocess_shape(oldh, oldw, self.target_length)
        scale = coords.new_tensor([w / oldw, h / oldh], dtype=torch.float)
        return coords.float() * scale

    def apply_boxes_torch(self, boxes: torch.Tensor, original_size: Tuple[int, ...]) -> torch.Tensor:
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)
