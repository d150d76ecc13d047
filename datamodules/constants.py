"""Pixel statistics (RGB, 0-255). Taken from segany.modeling.constants when that module
exists, so the model and the data can never disagree; defined here otherwise so the
datamodules work without the model package."""
try:  # pragma: no cover - depends on what the modeling package provides
    from segany.modeling.constants import PIXEL_MEAN, PIXEL_STD
except ImportError:  # the model package is optional for data work
    PIXEL_MEAN = [123.675, 116.28, 103.53]
    PIXEL_STD = [58.395, 57.12, 57.375]

PIXEL_MEAN = [float(v) for v in PIXEL_MEAN]
PIXEL_STD = [float(v) for v in PIXEL_STD]
