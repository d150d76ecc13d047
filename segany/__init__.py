"""segany: train Segment Anything models."""
from .modeling import CheckpointError, Sam, build_sam, save_official

__all__ = ["Sam", "build_sam", "save_official", "CheckpointError"]

try:  # the inference package lands beside the model
    from .inference import SamAutomaticMaskGenerator, SamPredictor  # noqa: F401
    __all__ += ["SamPredictor", "SamAutomaticMaskGenerator"]
except ImportError:  # pragma: no cover
    pass
