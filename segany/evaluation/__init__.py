"""segany.evaluation: zero-shot protocols (first version: interactive single-point mIoU)."""
from .clicks import center_click, distance_to_boundary, next_click
from .protocol import ClickProtocol, interactive_eval, summarize

__all__ = ["ClickProtocol", "interactive_eval", "summarize", "center_click", "next_click", "distance_to_boundary"]
