"""SAM's prompt encoder: points, boxes and a dense mask prompt -> embeddings.

Sparse prompts are tokens: each point is its random-Fourier positional encoding plus a
learned embedding for its label. Labels, one table row each:

    -1 padding ("not a point", positional encoding dropped)   0 negative point
     1 positive point    2 box top-left corner    3 box bottom-right corner

so a box is two points labelled 2 and 3.

Text (SAM paper §7.5, appendix D.5; not in the release): with ``text_embed_dim > 0`` a CLIP
embedding (N, text_embed_dim) is one more sparse token, label TEXT (4): ``text_proj`` (an MLP)
of the embedding plus its own learned type embedding ``text_embed``, no positional encoding.
It comes first: text alone [T, PAD] (laid out as a single point), with points
[T, p1..pk, PAD], with a box [T, TL, BR]. Off by default (``text_embed_dim=0``): the module
then has exactly the release's weights and outputs; with it on, the extra weights live under
``prompt_encoder.text_proj.*`` and ``prompt_encoder.text_embed.weight`` only.

The token layout is the release's, built by one
function, `prompt_tokens`, for the predictor, the evaluation and the training simulation
alike: the points in order, then the box's two corners, or one padding token when there is
no box (segment_anything's `_embed_points(pad=boxes is None)`). The release's call
`forward(points=(coords, labels), boxes=..., masks=...)` works unchanged; training passes
`tokens=` already laid out, since its rows mix point and box prompts in one (N, T) tensor.
"""

from typing import Optional, Tuple, Type

import torch
import torch.nn as nn
from timm.layers import LayerNorm2d

from segany.modeling.constants import BOX_BR, BOX_TL, PAD, TEXT

TEXT_KEYS = ("prompt_encoder.text_proj.", "prompt_encoder.text_embed.")  # the text token's weights in a Sam


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
        text_embed_dim: int = 0,
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
        self.text_embed_dim = int(text_embed_dim)
        if self.text_embed_dim > 0:  # the text prompt (segany): CLIP embedding -> one token
            self.text_proj = nn.Sequential(
                nn.Linear(self.text_embed_dim, embed_dim), activation(), nn.Linear(embed_dim, embed_dim)
            )
            self.text_embed = nn.Embedding(1, embed_dim)  # the text token's type embedding

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid -> (1, C, h, w)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def label_table(self) -> torch.Tensor:
        """(5, C) learned embedding per label, row = label + 1 ((6, C) with the text token)."""
        rows = [self.not_a_point_embed.weight] + [e.weight for e in self.point_embeddings]
        if self.text_embed_dim > 0:
            rows.append(self.text_embed.weight)
        return torch.cat(rows)

    def embed_tokens(
        self, coords: torch.Tensor, labels: torch.Tensor, text: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """(N, P, 2) pixel coords + (N, P) labels in {-1, 0, 1, 2, 3, 4} (+ text (N, D) CLIP
        embeddings, used where a row has a TEXT label) -> (N, P, C) tokens."""
        is_text = labels == TEXT
        if self.text_embed_dim == 0 and text is not None:
            raise ValueError("PromptEncoder: a text prompt was given but the model has no text token: text_embed_dim=0")
        # TEXT labels without embeddings: checked on the CPU only, where it costs no device sync
        # (the training rounds call this every round; on meta tensors it cannot be evaluated)
        if text is None and labels.device.type == "cpu" and bool(is_text.any()):
            raise ValueError(
                "PromptEncoder: TEXT tokens (label 4) need the text embeddings (tokens=(coords, labels, text))"
                + ("" if self.text_embed_dim else " and a model with text_embed_dim > 0")
            )
        pe = self.pe_layer.forward_with_coords(coords + 0.5, self.input_image_size)  # pixel centres
        is_point = ((labels != PAD) & ~is_text).unsqueeze(-1)
        out = torch.where(is_point, pe, torch.zeros_like(pe)) + self.label_table()[labels.long() + 1]
        if text is not None:
            if text.shape != (labels.shape[0], self.text_embed_dim):
                raise ValueError(
                    f"PromptEncoder: text embeddings of shape {tuple(text.shape)}, expected "
                    f"({labels.shape[0]}, {self.text_embed_dim}) (rows, text_embed_dim)"
                )
            proj = self.text_proj(text.to(out.dtype))  # (N, C)
            out = out + is_text.unsqueeze(-1).to(out.dtype) * proj[:, None, :]
        return out

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
        tokens: Optional[tuple] = None,
        text: Optional[torch.Tensor] = None,
        has_mask: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> sparse (N, T, C), dense (N, C, h, w). ``text``: (N, text_embed_dim) CLIP embeddings
        (one text token per row). ``tokens``: (coords (N, T, 2), labels (N, T)[, text (N, D)])
        already laid out by `prompt_tokens` (then points, boxes and text must be None).
        ``has_mask`` (N,) bool with ``masks``: only these rows' mask input counts, the others get
        the no-mask embedding (the release's ONNX decoder's ``has_mask_input``, per row)."""
        if tokens is not None and (points is not None or boxes is not None or text is not None):
            raise ValueError("PromptEncoder: pass tokens= or points/boxes/text, not both")
        tokens = tokens if tokens is not None else prompt_tokens(points, boxes, text)
        n = self._get_batch_size(tokens, None, masks)
        weight = self.no_mask_embed.weight
        if tokens is None:
            sparse = weight.new_zeros(n, 0, self.embed_dim)
        else:
            sparse = self.embed_tokens(*tokens)
        h, w = self.image_embedding_size
        no_mask = weight.reshape(1, -1, 1, 1).expand(n, -1, h, w)
        if masks is None:
            return sparse, no_mask
        dense = self._embed_masks(masks)
        if has_mask is not None:
            dense = torch.where(has_mask[:, None, None, None], dense, no_mask.to(dense.dtype))
        return sparse, dense


def prompt_tokens(
    points: Optional[Tuple[torch.Tensor, torch.Tensor]],
    boxes: Optional[torch.Tensor],
    text: Optional[torch.Tensor] = None,
) -> Optional[tuple]:
    """The release's sparse-prompt layout (SamPredictor -> PromptEncoder), the one used everywhere.

    points (coords (N, P, 2) xy px, labels (N, P)) and/or boxes (N, 4) xyxy px ->
    coords (N, T, 2), labels (N, T): the points in order, then the box as two corner tokens
    (BOX_TL, BOX_BR); points without a box get one padding token (PAD) after them. So one point
    is [p, PAD], a box [TL, BR], k points [p1..pk, PAD], a box and k points [p1..pk, TL, BR].
    None when there is nothing.

    text (N, D) CLIP embeddings (segany's text prompt) -> one TEXT token first (coords 0), and
    the embeddings as a third element: (coords, labels, text). Text without a box pads like a
    point: [T, PAD], [T, p1..pk, PAD]; with a box [T, TL, BR].
    """
    parts = []
    if text is not None:
        n = text.shape[0]
        parts.append((text.new_zeros(n, 1, 2).float(), torch.full((n, 1), TEXT, device=text.device)))
        if points is None and boxes is None:
            parts.append((text.new_zeros(n, 1, 2).float(), torch.full((n, 1), PAD, device=text.device)))
    if points is not None:
        coords, labels = points
        parts.append((coords.float(), labels.long()))
        if boxes is None:
            n = coords.shape[0]
            parts.append((coords.new_zeros(n, 1, 2).float(), labels.new_full((n, 1), PAD).long()))
    if boxes is not None:
        corners = boxes.reshape(-1, 2, 2).float()  # (N, 2, 2)
        parts.append((corners, torch.tensor([BOX_TL, BOX_BR], device=corners.device).expand(corners.shape[0], 2)))
    if not parts:
        return None
    coords, labels = torch.cat([c for c, _ in parts], dim=1), torch.cat([lab for _, lab in parts], dim=1)
    return (coords, labels) if text is None else (coords, labels, text)
