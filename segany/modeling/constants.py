"""Pre-processing constants of the released SAM (RGB, 0-255 pixel scale)."""

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
MASK_THRESHOLD = 0.0  # logits above this are foreground
