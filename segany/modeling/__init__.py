"""segany.modeling: the SAM network."""

from segany.modeling.build import VARIANTS, SamConfig, build_sam, sam_config
from segany.modeling.checkpoint import CheckpointError, load_mae_encoder, save_official
from segany.modeling.image_encoder import ImageEncoderViT
from segany.modeling.mask_decoder import MaskDecoder
from segany.modeling.prompt_encoder import PromptEncoder
from segany.modeling.sam import Sam
from segany.modeling.transformer import TwoWayTransformer

__all__ = [
    "VARIANTS",
    "SamConfig",
    "build_sam",
    "sam_config",
    "CheckpointError",
    "load_mae_encoder",
    "save_official",
    "ImageEncoderViT",
    "MaskDecoder",
    "PromptEncoder",
    "Sam",
    "TwoWayTransformer",
]
