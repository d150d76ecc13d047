"""Boundary IoU and spurious components (segany/evaluation/boundary.py): hand-computed values on
squares, a transcription of the reference's mask_to_boundary (boundary-iou-api,
boundary_iou/utils/boundary_utils.py: cv2.erode of the zero-padded mask) on random masks, the
components against scipy.ndimage.label, and the new keys of the points, noc and instances
results."""

import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from segany.evaluation.boundary import boundary_dilation, boundary_iou, inner_boundary, spurious_components

ROOT = Path(__file__).resolve().parents[1]
# real DAVIS-345 (RITM's packaging) in ../shared/data beside the checkout (SEGANY_SHARED_DATA overrides)
SHARED = Path(os.environ.get("SEGANY_SHARED_DATA", ROOT.parent / "shared" / "data"))
DAVIS = str(SHARED / "DAVIS")


def reference_boundary(mask: np.ndarray, dilation_ratio: float = 0.02) -> np.ndarray:
    """mask_to_boundary of boundary-iou-api, transcribed: uint8 (H, W) -> uint8 boundary."""
    h, w = mask.shape
    dilation = max(1, int(round(dilation_ratio * np.sqrt(h**2 + w**2))))
    padded = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    eroded = cv2.erode(padded, np.ones((3, 3), np.uint8), iterations=dilation)[1 : h + 1, 1 : w + 1]
    return mask - eroded


def reference_boundary_iou(gt: np.ndarray, pred: np.ndarray, dilation_ratio: float = 0.02) -> float:
    g = reference_boundary(gt.astype(np.uint8), dilation_ratio) > 0
    p = reference_boundary(pred.astype(np.uint8), dilation_ratio) > 0
    union = (g | p).sum()
    return (g & p).sum() / union if union else 1.0


def _square(shift: int = 0, size: int = 64) -> torch.Tensor:
    m = torch.zeros(size, size, dtype=torch.bool)
    m[10:30, 10 + shift : 30 + shift] = True  # 20 x 20
    return m


def test_one_pixel_shift_of_a_square_by_hand():
    g, p = _square(), _square(shift=1)
    # d = 1: each boundary is the 1-px ring, 20^2 - 18^2 = 76 px. Shifted right by 1, the rings share
    # 19 px of the top row and 19 of the bottom; the side columns (10, 29 vs 11, 30) none:
    # 38 / (76 + 76 - 38) = 1/3 (the mask IoU is 380/420)
    assert boundary_iou(g[None], p[None], 1).item() == pytest.approx(1 / 3)
    # d = 2: rings of 400 - 16^2 = 144 px; rows 10, 11, 28, 29 share 19 px each (76), the 16 rows
    # between share columns 11 and 29 (32): 108 / (288 - 108) = 0.6
    assert boundary_iou(g[None], p[None], 2).item() == pytest.approx(0.6)
    # 64 x 64: diagonal 90.5; ratio 0.02 -> d = round(1.81) = 2, ratio 0.01 -> round(0.905) = 1
    assert boundary_dilation(64, 64) == 2 and boundary_dilation(64, 64, 0.01) == 1
    assert boundary_dilation(10, 10, 0.001) == 1  # at least 1
    with pytest.raises(ValueError, match="boundary_dilation_ratio"):
        boundary_dilation(10, 10, 0.0)


def test_identical_disjoint_and_empty_masks():
    g, far = _square(), torch.zeros(64, 64, dtype=torch.bool)
    far[40:60, 40:60] = True
    empty = torch.zeros(64, 64, dtype=torch.bool)
    got = boundary_iou(torch.stack([g, far, empty, g]), torch.stack([g, g, empty, empty]), 2)
    assert got.tolist() == [1.0, 0.0, 1.0, 0.0]  # identical, disjoint, both empty (1), one empty (0)
    assert boundary_iou(empty[None], empty[None], 2, empty=0.0).item() == 0.0


def test_the_image_edge_is_background():
    full = torch.ones(1, 64, 64, dtype=torch.bool)
    assert inner_boundary(full, 1).sum().item() == 64 * 64 - 62 * 62  # the outer ring, as the reference's padding
    assert inner_boundary(full, 40).all()  # d beyond the half-size: all boundary


def test_matches_the_reference_mask_to_boundary_on_random_masks():
    rng = np.random.default_rng(0)
    for case in range(40):
        h, w = (int(v) for v in rng.integers(3, 120, 2))
        ratio = float(rng.choice([0.005, 0.02, 0.05, 0.2]))
        gt, pred = (
            cv2.GaussianBlur(rng.random((h, w)), (0, 0), float(rng.uniform(1, 4))) > rng.uniform(0.4, 0.6)
            for _ in range(2)
        )
        d = boundary_dilation(h, w, ratio)
        want = reference_boundary(gt.astype(np.uint8), ratio) > 0
        assert np.array_equal(inner_boundary(torch.from_numpy(gt), d).numpy(), want), (case, h, w, d)
        got = boundary_iou(torch.from_numpy(pred)[None], torch.from_numpy(gt)[None], d).item()
        assert got == pytest.approx(reference_boundary_iou(gt, pred, ratio), abs=1e-6), case


@pytest.mark.skipif(not os.path.isdir(DAVIS), reason=f"real DAVIS-345 masks not found at {DAVIS}")
def test_matches_the_reference_on_davis_masks():
    names = sorted(os.listdir(os.path.join(DAVIS, "gt")))[::115]  # 3 of the 345 masks, at their resolution
    for name in names:
        gt = cv2.imread(os.path.join(DAVIS, "gt", name)).max(axis=2) > 0
        pred = np.roll(gt, (3, -5), (0, 1))
        d = boundary_dilation(*gt.shape)
        want = reference_boundary(gt.astype(np.uint8)) > 0
        assert np.array_equal(inner_boundary(torch.from_numpy(gt), d).numpy(), want), name
        got = boundary_iou(torch.from_numpy(pred)[None], torch.from_numpy(gt)[None], d).item()
        assert got == pytest.approx(reference_boundary_iou(gt, pred), abs=1e-6), name


def test_one_dilation_per_row():
    rng = np.random.default_rng(1)
    gt, pred = (torch.from_numpy(cv2.GaussianBlur(rng.random((4, 50, 70)), (0, 0), 2) > 0.5) for _ in range(2))
    d = [1, 3, 1, 6]
    got = boundary_iou(pred, gt, torch.tensor(d))
    for r in range(4):
        assert got[r].item() == pytest.approx(boundary_iou(pred[r : r + 1], gt[r : r + 1], d[r]).item())
    assert torch.equal(boundary_iou(pred, gt, torch.tensor(d), chunk=1), got)  # chunks change nothing
    with pytest.raises(ValueError, match="3 dilations for 4 masks"):
        boundary_iou(pred, gt, [1, 2, 3])


def test_spurious_components_by_hand():
    gt = np.zeros((30, 30), bool)
    gt[5:15, 5:15] = True
    touching = gt.copy()
    touching[14:20, 14:20] = True  # one blob overlapping the GT
    one = touching.copy()
    one[25:28, 25:28] = True  # plus a disconnected blob
    two = one.copy()
    two[0:2, 25:29] = True  # plus another
    diagonal = np.zeros_like(gt)
    diagonal[20, 20] = diagonal[21, 21] = True  # diagonal neighbours: one component (8-connectivity)
    outside = np.zeros_like(gt)
    outside[15, 5:15] = True  # adjacent to the GT but sharing no pixel: spurious
    preds = np.stack([touching, one, two, diagonal, outside, np.zeros_like(gt)])
    assert spurious_components(preds, np.broadcast_to(gt, preds.shape)).tolist() == [0, 1, 2, 1, 1, 0]
    assert spurious_components(torch.from_numpy(one), torch.from_numpy(gt)).tolist() == [1]  # torch, (H, W)


def test_spurious_components_match_scipy_on_random_masks():
    from scipy import ndimage

    rng = np.random.default_rng(2)
    pred = rng.random((6, 40, 50)) > 0.7  # many small components, diagonal contacts included
    gt = cv2.GaussianBlur(rng.random((40, 50)), (0, 0), 3) > 0.5
    want = []
    for p in pred:
        labels, n = ndimage.label(p, np.ones((3, 3)))  # 8-connectivity
        want.append(len(set(range(1, n + 1)) - set(np.unique(labels[gt & p]).tolist())))
    assert spurious_components(pred, np.broadcast_to(gt, pred.shape)).tolist() == want
    assert max(want) > 5  # the case is not trivial


class _Everything(torch.nn.Module):
    """A stand-in model whose logits are +1 everywhere: the prediction is the input frame."""

    def __init__(self):
        super().__init__()
        self.image_encoder = lambda x: torch.zeros(x.shape[0], 8, 4, 4)
        self.prompt_encoder = self.mask_decoder = self

    def get_dense_pe(self):
        return torch.zeros(1, 8, 4, 4)

    def forward(self, points, boxes, masks):
        return points[0], None

    def predict_masks(self, emb, pe, sparse, dense):
        return torch.ones(sparse.shape[0], 4, 16, 16), torch.zeros(sparse.shape[0], 4)


def test_points_results_carry_boundary_iou_and_spurious_by_size():
    from segany.evaluation.points import PointsTask, points_merge, points_part
    from segany.evaluation.protocol import ClickProtocol
    from segany.evaluation.report import column_names

    S, (h, w) = 64, (48, 64)  # input frame 48 x 64 (diagonal 80: d = round(1.6) = 2), 4x the original area
    masks = torch.zeros(1, 4, S, S, dtype=torch.bool)
    masks[0, 0, 10:15, 10:11] = True  # small, all boundary, far from the frame's edge
    masks[0, 1, 0:15, 0:20] = True  # medium, in the frame's corner
    masks[0, 2, :h, :w] = True  # large: the whole frame, as the prediction
    batch = {
        "image": torch.zeros(1, 3, S, S),
        "original_size": torch.tensor([[96, 128]]),
        "input_size": torch.tensor([[h, w]]),
        "masks": masks,
        "valid": torch.tensor([[True, True, True, False]]),
        "image_id": ["a"],
    }

    class DM:
        class val_dataset:
            set_topology = staticmethod(lambda rank, world: None)

        val_dataloader = staticmethod(lambda: [batch])

    part = points_part(_Everything(), DM, ClickProtocol(clicks=(1, 2), boundary_dilation_ratio=0.02), "cpu")
    m = points_merge([part])
    # prediction's boundary: the 2-px ring of the 48 x 64 frame, 3072 - 44 * 60 = 432 px. The medium
    # mask's: 300 - 11 * 16 = 124 px (the frame's edge counts as background), of which rows 0-1
    # (40 px) and columns 0-1 below them (26 px) lie in the ring: 66 / (432 + 124 - 66)
    assert m["mbiou@1_small"] == 0.0 and m["mbiou@1_large"] == 1.0
    assert m["mbiou@1_medium"] == pytest.approx(66 / 490) and m["mbiou@2"] == pytest.approx((66 / 490 + 1) / 3)
    assert m["spurious@1"] == 0.0 and m["spurious@2_large"] == 0.0  # one component, touching every GT
    cols = column_names({"datasets": {"d": m}}, PointsTask.columns)
    assert {"mbiou@1", "mbiou@2", "mbiou@1_small", "spurious@1", "spurious@1_large"} <= set(cols)
    assert "mbiou@1" not in points_merge([{k: v for k, v in part.items() if k not in ("biou", "spurious")}])


def test_points_task_through_evaluate_writes_the_new_columns(tmp_path):
    from helpers import compose

    sys.path.insert(0, str(ROOT))
    import evaluate as evaluate_script

    data = [f"data.root={tmp_path}/syn", "data.num_train=1", "data.num_val=1", "data.shard_size=1"]
    data += ["data.num_workers=0", "data.min_side=96", "data.max_side=128", f"paths.root_dir={tmp_path}"]
    cfg = compose(*data, f"output_dir={tmp_path}/out", "task=points", "points.clicks=[1,2]", name="evaluate")
    sec = evaluate_script.evaluate(cfg)["points"]
    m = sec["datasets"]["synthetic"]
    assert 0.0 <= m["mbiou@2"] <= 1.0 and m["spurious@1"] >= 0.0 and "mbiou@1_large" in m
    header = next(line for line in (tmp_path / "out" / "results.md").read_text().splitlines() if "mbiou@1" in line)
    assert "| mbiou@1 | mbiou@2 |" in header and "| spurious@1 |" in header
    assert sec["settings"]["boundary_dilation_ratio"] == 0.02


def test_noc_metrics_and_object_scores_carry_boundary_iou():
    from segany.evaluation.noc import noc_metrics, object_scores

    gt = _square().numpy()
    shifted, far = _square(shift=1).numpy(), np.zeros_like(gt)
    far[50:55, 50:55] = True

    class Scripted:  # click 1: the shifted square; click 2: it plus a far blob
        def __init__(self):
            self.k = 0

        def predict(self, clicks, state):
            self.k += 1
            return (shifted if self.k == 1 else shifted | far), None

    got = object_scores(Scripted(), gt, np.zeros_like(gt), 2, dilation=1)
    # by hand (above): 38 / 114; the far 5 x 5 blob adds its 25 - 9 = 16 ring pixels to the union
    assert got["biou"] == pytest.approx([38 / 114, 38 / 130]) and got["spurious"] == [0, 1]
    m = noc_metrics(np.array([got["iou"]]), [0.9], 2, bious=[got["biou"]], spurious=[got["spurious"]])
    assert m["mbiou@1"] == pytest.approx(1 / 3) and m["mbiou@2"] == pytest.approx(38 / 130) and m["spurious@2"] == 1.0


def test_instances_boundary_iou_of_matched_detections():
    from segany.evaluation.instances import match_detections, matched_scores, matched_summary
    from segany.inference.amg_utils import coco_encode_rle, mask_to_rle_pytorch

    g1, g2 = _square().numpy(), np.zeros((64, 64), bool)
    g2[40:44, 40:44] = True  # 16 px: small
    anns = [  # the bins go by the annotation's stored area (COCO: original pixels): g1 medium, g2 small
        {"segmentation": coco_encode_rle(r), "category_id": 1, "iscrowd": 0, "area": area}
        for r, area in zip(mask_to_rle_pytorch(torch.from_numpy(np.stack([g1, g2]))), (2000.0, 16.0))
    ]
    masks = np.stack([_square(shift=1).numpy(), g1, g2])  # a shifted copy of g1 (higher score), g1 itself, g2
    rles = [coco_encode_rle(r) for r in mask_to_rle_pytorch(torch.from_numpy(masks))]
    dets = [{"segmentation": r, "score": s, "category_id": 1} for r, s in zip(rles, (0.9, 0.5, 0.7))]
    assert match_detections(dets, anns) == [(0, 0), (2, 1)]  # by score: the shifted one takes g1 first
    m = matched_summary(matched_scores(masks, dets, anns, dilation=1))
    assert m["mbiou"] == pytest.approx((1 / 3 + 1) / 2) and m["num_matched"] == 2
    assert m["mbiou_small"] == 1.0 and m["mbiou_medium"] == pytest.approx(1 / 3) and np.isnan(m["mbiou_large"])
    assert m["spurious"] == 0.0
    dets[0]["category_id"] = 2  # another category: no match for it, g1 goes to its exact copy
    assert match_detections(dets, anns) == [(2, 1), (1, 0)]
