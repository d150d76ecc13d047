"""Prompted mask prediction on a fixed image: embed once, prompt many times.

Drop-in replacement for ``segment_anything.SamPredictor`` (same constructor,
methods, arguments and return values).
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Optional, Tuple

import numpy as np
import torch

from segany.modeling.hq import MaskDecoderHQ
from segany.modeling.mask_decoder import MaskDecoder
from segany.modeling.transforms import ResizeLongestSide
from segany.utils.precision import check_precision, resolve_precision

# work is cut into chunks of at most this many bytes (here: one (rows, hw, C) float32 decoder
# activation; the mask generator: its upsampled logits). Small on purpose: buffers under the C
# allocator's mmap threshold (32 MiB) are reused, larger ones are mapped and page-faulted afresh on
# every call (2x slower upsampling, thresholding and counting, measured)
CHUNK_BYTES = 16 * 2**20


def autocast_context(precision: str, device: torch.device) -> ContextManager:
    """The compute precision of inference on ``device``: "fp32" (the release's numbers), "bf16"
    (``torch.autocast`` to bfloat16 on the device's own type, CPU or CUDA; weights and outputs
    stay fp32) or "auto" (bf16 where the device has bf16 units: segany/utils/precision.py)."""
    if resolve_precision(precision, device) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


class SamPredictor:
    """Compute a SAM image embedding once, then predict masks for prompts on it.

    Arguments:
      sam_model: a ``Sam`` (``segany.build_sam(...)`` or the official one).
      precision: "fp32" (default, the release's numbers), "bf16" (encoder and decoder under
        ``torch.autocast`` to bfloat16; every output stays float32) or "auto" (bf16 where the
        device has bf16 units).

    ``set_torch_image`` also accepts a batch of B same-size images; ``predict_torch``
    then takes ``B*M`` prompt rows, rows ``b*M .. b*M+M-1`` belonging to image ``b``.

    Text (segany, SAM paper §7.5): ``clip`` (a ``segany.modeling.clip.ClipEncoder``, also
    settable as the attribute) encodes ``predict(text="a wheel")`` for a model built with
    ``text_embed_dim`` = the CLIP width.

    HQ-SAM (a model built with ``hq_token=True``): ``set_image`` also keeps the encoder's early
    block features (``interm_features``, (B, embed_dim, h, w)); ``predict(..., hq_token_only=...)``
    as the HQ-SAM release's predictor: one mask per prompt (SAM's chosen mask + the HQ mask, or
    the HQ mask alone).
    """

    def __init__(self, sam_model: Any, clip: Any = None, precision: str = "fp32") -> None:
        check_precision(precision)
        self.model = sam_model
        self.clip = clip
        self.precision = precision
        self.transform = ResizeLongestSide(sam_model.image_encoder.img_size)
        self.reset_image()

    # ------------------------------------------------------------------ image

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Embed an (H, W, 3) uint8 image given in ``image_format`` ("RGB" or "BGR")."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        if image_format != self.model.image_format:
            image = image[..., ::-1]
        resized = self.transform.apply_image(np.ascontiguousarray(image))  # (h, w, 3) uint8
        if not resized.flags.writeable:  # PIL-backed arrays are read-only; torch wants writable
            resized = resized.copy()
        x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
        self.set_torch_image(x, image.shape[:2])  # x: (1, 3, h, w)

    @torch.no_grad()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: Tuple[int, ...]) -> None:
        """Embed image(s) already resized with ``ResizeLongestSide``.

        transformed_image: (B, 3, h, w), 0-255 values, ``max(h, w) == img_size``.
        original_image_size: (H, W) before resizing (shared by the batch).
        """
        img_size = self.model.image_encoder.img_size
        if (
            transformed_image.ndim != 4
            or transformed_image.shape[1] != 3
            or max(transformed_image.shape[2:]) != img_size
        ):
            raise ValueError(
                f"set_torch_image expects (B, 3, h, w) with long side {img_size}, got {tuple(transformed_image.shape)}"
            )
        self.reset_image()
        self.original_size = tuple(original_image_size)
        self.input_size = tuple(transformed_image.shape[-2:])
        x = self.model.preprocess(transformed_image)  # (B, 3, S, S) normalised, padded
        encoder = self.model.image_encoder
        with autocast_context(self.precision, self.device):
            if getattr(encoder, "interm_index", None) is None:
                self.features = encoder(x).float()  # (B, 256, S/16, S/16)
            else:  # HQ-SAM: and the early block's features (B, embed_dim, S/16, S/16)
                self.features, interm = encoder.forward_interm(x)
                self.features, self.interm_features = self.features.float(), interm.float()
        self.is_image_set = True

    def get_image_embedding(self) -> torch.Tensor:
        """The current image embedding, (B, 256, h, w) (B = 1 after ``set_image``)."""
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) to generate an embedding.")
        return self.features

    def reset_image(self) -> None:
        """Forget the current image."""
        self.is_image_set = False
        self.features: Optional[torch.Tensor] = None
        self.interm_features: Optional[torch.Tensor] = None  # HQ-SAM's early encoder features
        self.original_size: Optional[Tuple[int, ...]] = None
        self.input_size: Optional[Tuple[int, ...]] = None
        # kept for attribute compatibility with the official predictor
        self.orig_h = self.orig_w = self.input_h = self.input_w = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ------------------------------------------------------------------ prompts

    def predict(
        self,
        point_coords: Optional[np.ndarray] = None,
        point_labels: Optional[np.ndarray] = None,
        box: Optional[np.ndarray] = None,
        mask_input: Optional[np.ndarray] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        text: Optional[str] = None,
        hq_token_only: bool = False,
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predict masks for one prompt set, in original-image pixel coordinates.

        point_coords: (P, 2) xy px; point_labels: (P,) 1 = foreground, 0 = background;
        box: (4,) xyxy px; mask_input: (1, 4h, 4w) low-res logits from a previous call;
        text: a phrase, encoded by ``self.clip`` (combinable with the others).

        Returns masks (C, H, W) (bool, or float logits if ``return_logits``),
        iou predictions (C,) and low-res logits (C, 4h, 4w); C = 3 if multimask else 1
        (HQ-SAM: C = 1, see the class; hq_token_only is ignored by SAM).
        """
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        coords = labels = boxes = masks_in = None
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must be supplied together with point_coords.")
            xy = self.transform.apply_coords(point_coords, self.original_size)
            coords = torch.as_tensor(xy, dtype=torch.float, device=self.device)[None]  # (1, P, 2)
            labels = torch.as_tensor(point_labels, dtype=torch.int, device=self.device)[None]  # (1, P)
        if box is not None:
            xyxy = self.transform.apply_boxes(box, self.original_size)
            boxes = torch.as_tensor(xyxy, dtype=torch.float, device=self.device)[None]  # (1, 1, 4)
        if mask_input is not None:
            masks_in = torch.as_tensor(mask_input, dtype=torch.float, device=self.device)[None]  # (1, 1, 4h, 4w)

        text_emb = None
        if text is not None:
            if self.clip is None:
                raise ValueError("predict(text=...) needs a CLIP model: SamPredictor(model, clip=build_clip(...))")
            text_emb = self.clip.encode_text([text]).to(self.device)  # (1, D)
        masks, iou, low_res = self.predict_torch(
            coords,
            labels,
            boxes,
            masks_in,
            multimask_output,
            return_logits=return_logits,
            text=text_emb,
            hq_token_only=hq_token_only,
        )
        return tuple(t[0].detach().cpu().numpy() for t in (masks, iou, low_res))  # type: ignore[return-value]

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: Optional[torch.Tensor],
        point_labels: Optional[torch.Tensor],
        boxes: Optional[torch.Tensor] = None,
        mask_input: Optional[torch.Tensor] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        text: Optional[torch.Tensor] = None,
        hq_token_only: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Predict masks for N prompt sets already in the resized-input frame.

        point_coords: (N, P, 2) xy px; point_labels: (N, P); boxes: (N, 4) xyxy px;
        mask_input: (N, 1, 4h, 4w) logits; text: (N, D) CLIP embeddings.

        Returns masks (N, C, H, W) (bool unless ``return_logits``), iou predictions
        (N, C) and low-res logits (N, C, 4h, 4w).
        """
        low_res, iou = self.predict_low_res(
            point_coords, point_labels, boxes, mask_input, multimask_output, text=text, hq_token_only=hq_token_only
        )
        masks = self.upsample(low_res)  # (N, C, H, W)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, iou, low_res

    @torch.no_grad()
    def predict_low_res(
        self,
        point_coords: Optional[torch.Tensor],
        point_labels: Optional[torch.Tensor],
        boxes: Optional[torch.Tensor] = None,
        mask_input: Optional[torch.Tensor] = None,
        multimask_output: bool = True,
        min_iou: Optional[float] = None,
        text: Optional[torch.Tensor] = None,
        hq_token_only: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``predict_torch`` without the upsampling: low-res logits (N, C, 4h, 4w) and iou
        predictions (N, C), float32 in either precision.

        min_iou: with segany's decoder and one image, the logits of the prompts none of whose C
        predicted IoUs exceeds it are not computed (NaN); the automatic mask generator drops them."""
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        points = None
        if point_coords is not None:
            if point_coords.dtype == torch.float64:  # the release accepts float64 coords
                point_coords = point_coords.float()
            points = (point_coords, point_labels)
        extra = {} if text is None else {"text": text}  # a model without the text token takes no text=
        with autocast_context(self.precision, self.device):
            sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=mask_input, **extra)
            # sparse: (N, T, 256); dense: (N, 256, h, w)
            # -> (N, C, 4h, 4w), (N, C)
            low_res, iou = self._decode(sparse, dense, multimask_output, min_iou, hq_token_only)
        return low_res.float(), iou.float()

    def upsample(self, low_res: torch.Tensor) -> torch.Tensor:
        """Low-res logits (..., C, 4h, 4w) of the current image -> logits (..., C, H, W) at its size."""
        return self.model.postprocess_masks(low_res, self.input_size, self.original_size)

    def _decode(
        self,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        multimask_output: bool,
        min_iou: Optional[float] = None,
        hq_token_only: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Run the mask decoder; with B > 1 images, each image gets its own N/B rows."""
        image_pe = self.model.prompt_encoder.get_dense_pe()  # (1, 256, h, w)
        n_images = self.features.shape[0]
        decoder = self.model.mask_decoder
        hq = isinstance(decoder, MaskDecoderHQ)
        if hq or (n_images == 1 and isinstance(decoder, MaskDecoder) and sparse.shape[0] > 1):
            # rows are independent: decode a few at a time, so that each (rows, hw, C) activation stays
            # small enough for the allocator to reuse its memory (large buffers are mapped and
            # page-faulted afresh on every allocation, which costs as much as the arithmetic here);
            # segany's decoder groups the rows of B > 1 images itself (then one call)
            hw_c = self.features[0].numel()
            step = max(1, CHUNK_BYTES // (4 * hw_c)) if n_images == 1 else sparse.shape[0]
            sel = slice(1, None) if multimask_output else slice(0, 1)
            keep = None if min_iou is None else (lambda iou_all: (iou_all[:, sel] > min_iou).any(1))
            extra = {}
            if hq:  # the per-image HQ features, once for every chunk: (B, C/8, 4h, 4w)
                if self.interm_features is None:
                    raise RuntimeError("an HQ-SAM model needs the early encoder features: set the image again")
                extra = {"hq_features": decoder.hq_features(self.features, self.interm_features)}
            outs = [
                decoder.predict_masks(
                    self.features, image_pe, sparse[i : i + step], dense[i : i + step], keep=keep, **extra
                )
                for i in range(0, sparse.shape[0], step)
            ]
            masks, iou = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
            if hq:
                return decoder.select(masks, iou, multimask_output, hq_token_only)
            return masks[:, sel], iou[:, sel]
        if n_images == 1:
            return decoder(
                image_embeddings=self.features,
                image_pe=image_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
            )
        if sparse.shape[0] % n_images:
            raise ValueError(f"{sparse.shape[0]} prompt rows cannot be split over {n_images} images")
        rows = sparse.shape[0] // n_images
        outs = [
            decoder(
                image_embeddings=self.features[b : b + 1],
                image_pe=image_pe,
                sparse_prompt_embeddings=sparse[b * rows : (b + 1) * rows],
                dense_prompt_embeddings=dense[b * rows : (b + 1) * rows],
                multimask_output=multimask_output,
            )
            for b in range(n_images)
        ]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
