"""RITM's interactive benchmark (task=noc): the clicker against a transcription of RITM's own
(isegm/inference/clicker.py, SamsungLabs/ritm_interactive_segmentation) on synthetic masks with an
ignore band and on real DAVIS masks (opt-in), NoC / NoF / mIoU@k on IoUs and scripted predictions
whose answers are known by hand."""

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from segany.evaluation.clicks import Clicker, center_click
from segany.evaluation.noc import SamSegmenter, iou_outside, noc_metrics, object_ious

# real DAVIS-345 (RITM's packaging) in ../shared/data beside the checkout (SEGANY_SHARED_DATA overrides)
SHARED = Path(os.environ.get("SEGANY_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
DAVIS = str(SHARED / "DAVIS")


# --- RITM's clicker, transcribed from isegm/inference/clicker.py (Clicker._get_next_click, add_click;
# gt_mask: 1 object, -1 ignore, 0 background; np.bool -> bool for current numpy) -----------------
class RitmClicker:
    def __init__(self, gt_mask, ignore_label=-1):
        self.gt_mask = gt_mask == 1
        self.not_ignore_mask = gt_mask != ignore_label
        self.not_clicked_map = np.ones_like(self.gt_mask, dtype=bool)
        self.clicks_list = []

    def make_next_click(self, pred_mask):
        click = self._get_next_click(pred_mask)
        self.clicks_list.append(click)
        self.not_clicked_map[click[1][0], click[1][1]] = False

    def _get_next_click(self, pred_mask, padding=True):
        fn_mask = np.logical_and(np.logical_and(self.gt_mask, np.logical_not(pred_mask)), self.not_ignore_mask)
        fp_mask = np.logical_and(np.logical_and(np.logical_not(self.gt_mask), pred_mask), self.not_ignore_mask)
        if padding:
            fn_mask = np.pad(fn_mask, ((1, 1), (1, 1)), "constant")
            fp_mask = np.pad(fp_mask, ((1, 1), (1, 1)), "constant")
        fn_mask_dt = cv2.distanceTransform(fn_mask.astype(np.uint8), cv2.DIST_L2, 0)
        fp_mask_dt = cv2.distanceTransform(fp_mask.astype(np.uint8), cv2.DIST_L2, 0)
        if padding:
            fn_mask_dt = fn_mask_dt[1:-1, 1:-1]
            fp_mask_dt = fp_mask_dt[1:-1, 1:-1]
        fn_mask_dt = fn_mask_dt * self.not_clicked_map
        fp_mask_dt = fp_mask_dt * self.not_clicked_map
        fn_max_dist = np.max(fn_mask_dt)
        fp_max_dist = np.max(fp_mask_dt)
        is_positive = fn_max_dist > fp_max_dist
        if is_positive:
            coords_y, coords_x = np.where(fn_mask_dt == fn_max_dist)
        else:
            coords_y, coords_x = np.where(fp_mask_dt == fp_max_dist)
        return bool(is_positive), (int(coords_y[0]), int(coords_x[0]))


def _disc_model(shape, clicks, radius):
    """A deterministic stand-in for a model: the discs around the positive clicks minus those
    around the negative ones (so that a click changes the next error, as a model's answer does)."""
    pos, neg = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    for y, x, label in clicks:
        cv2.circle(pos if label else neg, (x, y), radius, 1, -1)
    return (pos > 0) & ~(neg > 0)


def _agree(gt, ignore, n_clicks, preds):
    """Run both clickers n_clicks times; preds(k, clicks) -> the prediction after k clicks."""
    encoded = gt.astype(np.int32)
    encoded[ignore] = -1
    ritm, ours = RitmClicker(encoded), Clicker(gt, ignore)
    pred = np.zeros(gt.shape, bool)
    for k in range(n_clicks):
        ritm.make_next_click(pred)
        y, x, label = ours.click(pred)
        pos, (ry, rx) = ritm.clicks_list[-1]
        assert (y, x, label) == (ry, rx, int(pos)), f"click {k + 1}: ours {(y, x, label)}, RITM {(ry, rx, pos)}"
        pred = preds(k + 1, ours.clicks)
    return ours.clicks


def test_clicker_matches_ritm_on_masks_with_an_ignore_band():
    rng = np.random.default_rng(0)
    h, w = 60, 80
    stuck = 0
    for case in range(30):
        gt = np.zeros((h, w), np.uint8)
        for _ in range(rng.integers(1, 4)):  # rectangles (ties everywhere) and ellipses
            y, x = rng.integers(0, h - 10), rng.integers(0, w - 10)
            if rng.random() < 0.5:
                gt[y : y + rng.integers(3, 30), x : x + rng.integers(3, 40)] = 1
            else:
                axes = (int(rng.integers(3, 20)), int(rng.integers(3, 15)))
                cv2.ellipse(gt, (int(x), int(y)), axes, 0, 0, 360, 1, -1)
        gt = gt > 0
        k = np.ones((3, 3), np.uint8)
        band = (cv2.dilate(gt.astype(np.uint8), k, iterations=2) > 0) & ~(cv2.erode(gt.astype(np.uint8), k) > 0)
        if case % 3 == 0:
            band[:] = False  # no ignore region at all
        mode = case % 2
        if mode == 0:  # a model that answers with discs around the clicks
            preds = lambda n, clicks: _disc_model(gt.shape, clicks, 4)  # noqa: E731
        else:  # a model stuck on one wrong answer: only not_clicked_map moves the clicks on
            wrong = np.roll(gt, (3, 5), (0, 1))
            preds = lambda n, clicks: wrong  # noqa: E731
        clicks = _agree(gt, band, 12, preds)
        assert not band[tuple(np.array([c[:2] for c in clicks]).T)].any()  # never in the ignore band
        assert len({c[:2] for c in clicks}) == len(clicks)  # never the same pixel twice
        stuck += mode
    assert stuck == 15


def test_ties_and_the_strict_comparison():
    gt = np.zeros((20, 20), bool)
    gt[2:6, 2:6] = True  # FN square 4x4: deepest distance 2
    pred = np.zeros((20, 20), bool)
    pred[12:16, 12:16] = True  # FP square 4x4: the same depth -> a tie -> negative (RITM: strict >)
    c = Clicker(gt)
    c.add(*center_click(gt), 1)  # pretend click 1 was placed; not at the FP
    y, x, label = c.click(pred)
    assert label == 0 and (y, x) == (13, 13)  # first of the four deepest pixels in row-major order
    y, x, label = c.click(pred)
    assert label == 0 and (y, x) == (13, 14)  # (13, 13) is clicked: the next of the tie


@pytest.mark.skipif(not os.path.isdir(DAVIS), reason=f"real DAVIS-345 masks not found at {DAVIS}")
def test_clicker_matches_ritm_on_davis():
    names = sorted(os.listdir(os.path.join(DAVIS, "gt")))[::69]  # 5 of the 345 masks
    for name in names:
        bgr = cv2.imread(os.path.join(DAVIS, "gt", name))
        gt = bgr.max(axis=2) > 0  # RITM's DavisDataset: any value > 0 is the object
        preds = lambda n, clicks: _disc_model(gt.shape, clicks, 25 + 5 * (n % 3))  # noqa: E731
        _agree(gt, np.zeros_like(gt), 20, preds)


def test_noc_nof_miou_on_known_ious():
    ious = np.array(
        [
            [0.5, 0.81, 0.86, 0.91, 0.95],  # NoC@80 2, @85 3, @90 4
            [0.9, 0.9, 0.9, 0.9, 0.9],  # 1, 1, 1
            [0.1, 0.2, 0.3, 0.4, 0.84],  # 5 (reached at the last click: RITM counts it as a failure), 5, 5
            [0.79, 0.6, 0.85, 0.7, 0.7],  # 3, 3, 5 (never)
        ]
    )
    m = noc_metrics(ious, [0.8, 0.85, 0.9], max_clicks=5)
    assert m["NoC@80"] == pytest.approx((2 + 1 + 5 + 3) / 4)
    assert m["NoC@85"] == pytest.approx((3 + 1 + 5 + 3) / 4)
    assert m["NoC@90"] == pytest.approx((4 + 1 + 5 + 5) / 4)
    assert (m["NoF@80"], m["NoF@85"], m["NoF@90"]) == (1, 1, 2)
    assert m["miou@1"] == pytest.approx((0.5 + 0.9 + 0.1 + 0.79) / 4)
    assert m["miou@5"] == pytest.approx((0.95 + 0.9 + 0.84 + 0.7) / 4)
    assert m["num_objects"] == 4


def test_iou_leaves_the_ignore_region_out():
    gt = np.zeros((10, 10), bool)
    gt[2:8, 2:8] = True  # 36 px
    ignore = np.zeros_like(gt)
    ignore[0:2, :] = True  # 20 px band
    pred = gt.copy()
    pred[0:2, :] = True  # wrong only in the ignore band
    assert iou_outside(pred, gt, ignore) == 1.0
    pred[8, 2:8] = True  # 6 px of real FP
    assert iou_outside(pred, gt, ignore) == pytest.approx(36 / 42)


class ScriptedPredictor:
    """Answers click k with scripted masks; records what it was asked."""

    def __init__(self, answers):
        self.answers, self.calls = answers, []

    def predict(self, point_coords, point_labels, mask_input=None, multimask_output=True):
        k = len(self.calls)
        self.calls.append((point_coords.copy(), point_labels.copy(), mask_input, multimask_output))
        masks, scores = self.answers[k]
        low = np.stack([np.full((8, 8), 10.0 * k + i) for i in range(len(masks))])  # tags the token and click
        return np.array(masks), np.array(scores, np.float32), low


def test_object_ious_prompts_like_the_release_and_scores_known_answers():
    gt = np.zeros((20, 20), bool)
    gt[5:15, 5:15] = True  # 100 px, centre click at (9, 9)
    half, full, empty = gt.copy(), gt.copy(), np.zeros_like(gt)
    half[5:15, 10:15] = False  # IoU 0.5
    grown = gt.copy()
    grown[5:15, 15:16] = True  # IoU 100/110
    answers = [
        ([empty, half, full], [0.1, 0.9, 0.5]),  # multimask: the most confident (half) is taken, not the best
        ([grown], [0.5]),
        ([full], [0.5]),
    ]
    p = ScriptedPredictor(answers)
    ious = object_ious(SamSegmenter(p), gt, np.zeros_like(gt), max_clicks=3)
    assert ious == pytest.approx([0.5, 100 / 110, 1.0])
    assert noc_metrics(np.array([ious]), [0.85, 0.9, 0.95], 3)["NoC@90"] == 2
    (c1, l1, m1, mm1), (c2, l2, m2, mm2), (c3, l3, m3, mm3) = p.calls
    assert mm1 and not mm2 and not mm3 and m1 is None
    assert c1.tolist() == [[9.0, 9.0]] and l1.tolist() == [1]  # (x, y) of the distance-transform maximum
    assert m2.shape == (1, 8, 8) and (m2 == 1.0).all()  # click 1's chosen token (1) fed back
    assert (m3 == 10.0).all()  # click 2's only token
    assert l2.tolist() == [1, 1] and c2[1, 0] >= 10  # the FN half on the right
    assert l3.tolist() == [1, 1, 0] and c3[2, 0] == 15  # the FP column


def test_the_noc_table_columns_select_the_metrics_in_their_order():
    from segany.evaluation.noc import NocTask
    from segany.evaluation.report import column_names

    m = noc_metrics(np.full((2, 12), 0.5), [0.8, 0.9], 12)  # NoC@80, NoF@80, NoC@90, NoF@90, miou@1..12, ...
    got = column_names({"datasets": {"d": dict(m, num_images=1)}}, NocTask.columns)
    mious = [f"miou@{k}" for k in (1, 2, 3, 5, 10)]  # of 1, 2, 3, 5, 10, 20: those <= 12 clicks
    assert got == ["NoC@80", "NoC@90", "NoF@80", "NoF@90", *mious, "num_objects", "num_images"]
