"""SAM's prompt encoder: points, boxes and a dense mask prompt -> embeddings.

Sparse prompts are tokens: each point is its random-Fourier positional encoding plus a
learned embedding for its label. Labels, one table row each:

    -1 padding ("not a point", positional encoding dropped)   0 negative point
     1 positive point    2 box top-left corner    3 box bottom-right corner

so a box is two points labelled 2 and 3, and a batch may mix boxes, points and padding
in one (N, P) tensor (what the training loop needs). The release's call
`forward(points=(coords, labels), boxes=..., masks=...)` works unchanged, including its
padding point appended when points come without a box.
"""

from typing import Optional, Tuple, Type

import torch
import torch.nn as nn

from segany.modeling.common import LayerNorm2d
from segany.modeling.constants import BOX_BR, BOX_TL, PAD


class PositionEmbeddingRandom(nn.Module):
    """Positional encoding with random spatial frequencies (Tancik et al. 2020)."""

    def __init__(self, num_pos_feats: int = 128, scale: Optional[float] = None) -> None:
        super().__init__()
        scale = 1.0 if scale is None or scale <= 0.0 else scale
        self.register_buffer(
            "positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats))
        )  # (2, C/2), in the state_dict

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """(..., 2) coords normalised to [0, 1] -> (..., C)."""
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        coords = 2 * torch.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: Tuple[int, int]) -> torch.Tensor:
        """Encoding of the centre of every cell of an (h, w) grid -> (C, h, w)."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (h, w, 2) as (x, y)
        return self._pe_encoding(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
        """(..., 2) pixel coords (x, y) in an image of (h, w) = image_size -> (..., C)."""
        coords = coords.float()  # float64 coordinates (numpy) are accepted, as in the release
        return self._pe_encoding(coords / coords.new_tensor([image_size[1], image_size[0]]))


class PromptEncoder(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: Tuple[int, int],
        input_image_size: Tuple[int, int],
        mask_in_chans: int = 16,
        activation: Type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = tuple(input_image_size)
        self.image_embedding_size = tuple(image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # negative, positive, box top-left, box bottom-right
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid -> (1, C, h, w)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def label_table(self) -> torch.Tensor:
        """(5, C) learned embedding per label, row = label + 1."""
        return torch.cat([self.not_a_point_embed.weight] + [e.weight for e in self.point_embeddings])

    def embed_tokens(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N, P, 2) pixel coords + (N, P) labels in {-1, 0, 1, 2, 3} -> (N, P, C) tokens."""
        pe = self.pe_layer.forward_with_coords(coords + 0.5, self.input_image_size)  # pixel centres
        is_point = (labels != PAD).unsqueeze(-1)
        return torch.where(is_point, pe, torch.zeros_like(pe)) + self.label_table()[labels.long() + 1]

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        if pad:  # the release appends one padding point when there is no box
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), PAD)], dim=1)
        return self.embed_tokens(points, labels)

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        corners = boxes.reshape(-1, 2, 2)  # (N, 2, 2)
        labels = corners.new_tensor([BOX_TL, BOX_BR], dtype=torch.long).expand(corners.shape[0], 2)
        return self.embed_tokens(corners, labels)

    def _embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        return self.mask_downscaling(masks)  # (N, 1, 4h, 4w) -> (N, C, h, w)

    def _get_batch_size(self, points, boxes, masks) -> int:
        if points is not None:
            return points[0].shape[0]
        if boxes is not None:
            return boxes.shape[0]
        if masks is not None:
            return masks.shape[0]
        return 1

    def _get_device(self) -> torch.device:
        return self.point_embeddings[0].weight.device

    def forward(
        self,
        points: Optional[Tuple[torch.Tensor, torch.Tensor]],
        boxes: Optional[torch.Tensor],
        masks: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> sparse (N, T, C), dense (N, C, h, w)."""
        n = self._get_batch_size(points, boxes, masks)
        weight = self.no_mask_embed.weight
        tokens = [weight.new_zeros(n, 0, self.embed_dim)]
        if points is not None:
            tokens.append(self._embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            tokens.append(self._embed_boxes(boxes))
        sparse = torch.cat(tokens, dim=1)
        if masks is not None:
            dense = self._embed_masks(masks)
        else:
            h, w = self.image_embedding_size
            dense = weight.reshape(1, -1, 1, 1).expand(n, -1, h, w)
        return sparse, dense
