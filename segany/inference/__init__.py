"""Inference on trained SAM models: prompted prediction and automatic mask generation.

``SamPredictor`` and ``SamAutomaticMaskGenerator`` mirror the official
``segment_anything`` classes (constructor arguments, methods, outputs), so code
written for the release ports by changing the import. ``OnnxPredictor``: SamPredictor on
onnxruntime, for the files of ``python -m segany.export CKPT OUT --format onnx``.
"""

from segany.inference.amg import SamAutomaticMaskGenerator
from segany.inference.onnx_predictor import OnnxPredictor
from segany.inference.predictor import SamPredictor

__all__ = ["OnnxPredictor", "SamAutomaticMaskGenerator", "SamPredictor"]
