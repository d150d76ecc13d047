"""segany: train Segment Anything models."""

from segany.inference import SamAutomaticMaskGenerator, SamPredictor
from segany.modeling import CheckpointError, Sam, build_sam, save_official

__all__ = ["Sam", "build_sam", "save_official", "CheckpointError", "SamPredictor", "SamAutomaticMaskGenerator"]
