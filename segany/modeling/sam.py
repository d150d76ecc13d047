"""Sam: image encoder + prompt encoder + mask decoder, with the release's pre/post-processing.

Beyond the release's API (`forward(batched_input, multimask_output)`, `preprocess`,
`postprocess_masks`), `decode` runs the decoder for B images x M prompts in one call.
Nothing here is under `no_grad`: the same module trains. `assemble(cfg)`: a fresh Sam of
architecture `cfg` (segany.modeling.variants.SamConfig).

HQ-SAM (`cfg.hq_token`, segany.modeling.hq): the decoder is a `MaskDecoderHQ` and the encoder
also gives an early block's features (`encode_image(..., return_interm=True)`), which `decode`
and the decoder take as `interm_embeddings`.
"""

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from segany.modeling.constants import MASK_THRESHOLD, PIXEL_MEAN, PIXEL_STD
from segany.modeling.hq import MaskDecoderHQ
from segany.modeling.image_encoder import ImageEncoderViT
from segany.modeling.mask_decoder import MaskDecoder
from segany.modeling.prompt_encoder import PromptEncoder
from segany.modeling.transformer import TwoWayTransformer
from segany.modeling.variants import SamConfig, hq_dims


class Sam(nn.Module):
    mask_threshold: float = MASK_THRESHOLD
    image_format: str = "RGB"

    def __init__(
        self,
        image_encoder: ImageEncoderViT,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        pixel_mean=PIXEL_MEAN,
        pixel_std=PIXEL_STD,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        # not in the release's state_dict
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float).view(-1, 1, 1), False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def img_size(self) -> int:
        return self.image_encoder.img_size

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, str]:
        """timm's layer grouping (used by ``timm.optim.param_groups_layer_decay``): patch and
        position embedding first, then encoder block i, then everything after the blocks
        (neck, prompt encoder, mask decoder: unmatched names go last)."""
        return {
            "stem": r"^image_encoder\.(?:patch_embed|pos_embed|cls_token)",
            "blocks": r"^image_encoder\.blocks\.(\d+)\.",
        }

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """(..., 3, h, w) 0-255 RGB, already resized -> normalised, zero-padded to (S, S)."""
        x = (x - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        return F.pad(x, (0, self.img_size - w, 0, self.img_size - h))

    def postprocess_masks(
        self, masks: torch.Tensor, input_size: Tuple[int, ...], original_size: Tuple[int, ...]
    ) -> torch.Tensor:
        """(B, K, 4h, 4w) low-res logits -> (B, K, H, W) logits at the original image size.

        The release upsamples to img_size x img_size and then crops to ``input_size``; here only
        the low-res rows/columns that the kept region reads are upsampled (plus one of margin, so
        no kept pixel sees the clamped border), at the same integer scale: the same numbers, bit
        for bit, without computing the padding."""
        lh, lw = masks.shape[-2:]
        if self.img_size % lh == 0 and self.img_size % lw == 0:
            sh, sw = self.img_size // lh, self.img_size // lw
            rows, cols = min(lh, -(-input_size[0] // sh) + 1), min(lw, -(-input_size[1] // sw) + 1)
            masks = masks[..., :rows, :cols]
            masks = F.interpolate(masks, (rows * sh, cols * sw), mode="bilinear", align_corners=False)
        else:
            masks = F.interpolate(masks, (self.img_size, self.img_size), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        if tuple(masks.shape[-2:]) == tuple(original_size):
            # the release resamples to the same size: source pixel = output pixel, weights 1 and 0,
            # the identity bit for bit (finite logits); a view, not a pass over every pixel
            return masks
        return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)

    @property
    def hq(self) -> bool:
        """An HQ-SAM model (its decoder has the HQ token)."""
        return isinstance(self.mask_decoder, MaskDecoderHQ)

    def encode_image(self, images: torch.Tensor, return_interm: bool = False):
        """(B, 3, S, S) normalised, padded -> (B, 256, S/16, S/16); with return_interm, the pair
        (embedding, early block features (B, embed_dim, S/16, S/16)), the latter None unless HQ."""
        if not return_interm:
            return self.image_encoder(images)
        return self.image_encoder.forward_interm(images)

    def decode(
        self,
        image_embeddings: torch.Tensor,  # (B, C, h, w)
        point_coords: Optional[torch.Tensor] = None,  # (B, M, P, 2) input-frame pixels
        point_labels: Optional[torch.Tensor] = None,  # (B, M, P) in {-1, 0, 1, 2, 3}
        boxes: Optional[torch.Tensor] = None,  # (B, M, 4) xyxy
        mask_inputs: Optional[torch.Tensor] = None,  # (B, M, 4h, 4w) logits
        multimask_output: Optional[bool] = True,
        text: Optional[torch.Tensor] = None,  # (B, M, D) CLIP embeddings (text_embed_dim > 0)
        interm_embeddings: Optional[torch.Tensor] = None,  # (B, embed_dim, h, w) HQ: encode_image(.., True)[1]
        hq_token_only: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """B images x M prompts in one call -> masks (B, M, K, 4h, 4w), iou_pred (B, M, K).

        K = 3 with multimask_output, 1 without, 4 (every mask token) with None.
        HQ-SAM: K = 1 with multimask_output True or False (SAM's chosen mask + the HQ mask, or the
        HQ mask alone with hq_token_only, as the release's predictor); with None every token's
        mask, SAM's 4 then the HQ one: masks (B, M, 5, 4h, 4w), iou_pred (B, M, 4) (SAM's tokens).
        """
        ref = next((t for t in (point_labels, boxes, mask_inputs, text) if t is not None), None)
        if ref is None:
            raise ValueError("decode needs at least one of points, boxes, mask_inputs or text")
        b, m = ref.shape[:2]
        points = None
        if point_coords is not None:
            points = (point_coords.flatten(0, 1), point_labels.flatten(0, 1))
        sparse, dense = self.prompt_encoder(
            points=points,
            boxes=None if boxes is None else boxes.flatten(0, 1),
            masks=None if mask_inputs is None else mask_inputs.flatten(0, 1).unsqueeze(1),
            text=None if text is None else text.flatten(0, 1),
        )
        image_pe = self.prompt_encoder.get_dense_pe()
        hq = {"interm_embeddings": interm_embeddings} if self.hq else {}
        masks, iou = self.mask_decoder.predict_masks(image_embeddings, image_pe, sparse, dense, **hq)
        if multimask_output is not None:
            select = {"hq_token_only": hq_token_only} if self.hq else {}
            masks, iou = self.mask_decoder.select(masks, iou, multimask_output, **select)
        return masks.unflatten(0, (b, m)), iou.unflatten(0, (b, m))

    def forward(
        self, batched_input: List[Dict[str, Any]], multimask_output: bool, hq_token_only: bool = False
    ) -> List[Dict[str, torch.Tensor]]:
        """The release's API: a list of per-image dicts with 'image' (3, h, w) resized 0-255,
        'original_size', and optional 'point_coords' (M, P, 2), 'point_labels' (M, P),
        'boxes' (M, 4), 'mask_inputs' (M, 1, 4h, 4w). Images are encoded in one batch;
        prompts are decoded per image since their layouts may differ. hq_token_only: HQ-SAM's
        (its release's API), ignored by SAM."""
        images = torch.stack([self.preprocess(x["image"]) for x in batched_input])
        embeddings, interms = self.encode_image(images, return_interm=True)
        outputs = []
        for i, (record, embedding) in enumerate(zip(batched_input, embeddings)):
            points = (record["point_coords"], record["point_labels"]) if "point_coords" in record else None
            sparse, dense = self.prompt_encoder(
                points=points, boxes=record.get("boxes"), masks=record.get("mask_inputs")
            )
            hq = {"hq_token_only": hq_token_only, "interm_embeddings": interms[i : i + 1]} if self.hq else {}
            low_res, iou = self.mask_decoder(
                embedding.unsqueeze(0), self.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output, **hq
            )
            masks = self.postprocess_masks(low_res, record["image"].shape[-2:], record["original_size"])
            outputs.append({"masks": masks > self.mask_threshold, "iou_predictions": iou, "low_res_logits": low_res})
        return outputs


def assemble(cfg: SamConfig) -> Sam:
    """A freshly initialised `Sam` of architecture `cfg`, which it keeps as `model.config`."""
    grid = cfg.img_size // cfg.patch_size
    image_encoder = ImageEncoderViT(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        global_attn_indexes=cfg.global_attn_indexes,
        window_size=cfg.window_size,
        out_chans=cfg.prompt_embed_dim,
        drop_path_rate=cfg.drop_path_rate,
        grad_checkpointing=cfg.grad_checkpointing,
        interm_index=hq_dims(cfg)[0] if cfg.hq_token else None,
    )
    prompt_encoder = PromptEncoder(
        embed_dim=cfg.prompt_embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(cfg.img_size, cfg.img_size),
        mask_in_chans=cfg.mask_in_chans,
        text_embed_dim=cfg.text_embed_dim,
    )
    transformer = TwoWayTransformer(
        depth=cfg.decoder_depth,
        embedding_dim=cfg.prompt_embed_dim,
        num_heads=cfg.decoder_heads,
        mlp_dim=cfg.decoder_mlp_dim,
        dropout=cfg.decoder_dropout,
    )
    decoder_args = dict(
        transformer_dim=cfg.prompt_embed_dim,
        transformer=transformer,
        num_multimask_outputs=cfg.num_multimask_outputs,
        iou_head_depth=cfg.iou_head_depth,
        iou_head_hidden_dim=cfg.iou_head_hidden_dim,
    )
    if cfg.hq_token:
        _, compress, hidden = hq_dims(cfg)
        mask_decoder = MaskDecoderHQ(vit_dim=cfg.embed_dim, compress_dim=compress, hidden_dim=hidden, **decoder_args)
    else:
        mask_decoder = MaskDecoder(**decoder_args)
    model = Sam(image_encoder, prompt_encoder, mask_decoder)
    model.config = cfg
    return model
