"""Constants of the released SAM: pre-processing (RGB, 0-255 pixel scale), mask threshold,
and the prompt encoder's point labels."""

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
MASK_THRESHOLD = 0.0  # logits above this are foreground

# point labels of the prompt encoder (the release's): padding (no point), negative click,
# positive click, box top-left corner, box bottom-right corner; TEXT (segany's, not the release's):
# a CLIP embedding as a prompt token (SAM paper §7.5), only with PromptEncoder(text_embed_dim > 0)
PAD, NEG, POS, BOX_TL, BOX_BR, TEXT = -1, 0, 1, 2, 3, 4
