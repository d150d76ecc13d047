"""segany.evaluation: the SAM paper's zero-shot protocols — interactive single-point mIoU
(points), RITM's interactive benchmark (noc: NoC@85/90, mIoU vs clicks), object proposals
(mask AR), instance segmentation from boxes (mask AP), edge detection (the BSDS500 benchmark's
ODS/OIS/AP), text-to-mask (crop_prompts, text; models with the text token) —
and their metrics; evaluate.py drives them (runner.py). Each task is a class
registered in registry.TASKS by its module, imported here in the order task=all runs them."""

# isort: off
from segany.evaluation import points, noc, proposals, instances, edges, text  # noqa: F401 (registers the tasks)

# isort: on
from segany.evaluation.bsds import image_counts
from segany.evaluation.bsds import summarize as summarize_edges
from segany.evaluation.clicks import Clicker, center_click, distance_to_boundary, next_click, random_click
from segany.evaluation.coco_metrics import coco_ground_truth, mask_ap, mask_ar
from segany.evaluation.edges import edge_map, edge_nms
from segany.evaluation.instances import load_detections, segment_boxes
from segany.evaluation.noc import noc_metrics
from segany.evaluation.proposals import proposal_generator, rank_proposals
from segany.evaluation.protocol import ClickProtocol, interactive_eval, summarize
from segany.evaluation.registry import TASKS, EvalTask, ImageTask, register

__all__ = [
    "TASKS",
    "EvalTask",
    "ImageTask",
    "register",
    "ClickProtocol",
    "interactive_eval",
    "summarize",
    "Clicker",
    "center_click",
    "next_click",
    "random_click",
    "distance_to_boundary",
    "noc_metrics",
    "coco_ground_truth",
    "mask_ar",
    "mask_ap",
    "proposal_generator",
    "rank_proposals",
    "segment_boxes",
    "load_detections",
    "edge_map",
    "edge_nms",
    "image_counts",
    "summarize_edges",
]
