"""segany.modeling: the SAM network."""
from .build import VARIANTS, SamConfig, build_sam, sam_config
from .checkpoint import CheckpointError, load_mae_encoder, load_official, save_official
from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .sam import Sam
from .transformer import TwoWayTransformer

__all__ = ["VARIANTS", "SamConfig", "build_sam", "sam_config", "CheckpointError", "load_mae_encoder",
           "load_official", "save_official", "ImageEncoderViT", "MaskDecoder", "PromptEncoder", "Sam",
           "TwoWayTransformer"]
