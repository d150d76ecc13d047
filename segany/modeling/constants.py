"""Constants of the released SAM: pre-processing (RGB, 0-255 pixel scale), mask threshold,
and the prompt encoder's point labels."""

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
MASK_THRESHOLD = 0.0  # logits above this are foreground

# point labels of the prompt encoder (the release's): padding (no point), negative click,
# positive click, box top-left corner, box bottom-right corner
PAD, NEG, POS, BOX_TL, BOX_BR = -1, 0, 1, 2, 3
