"""Edge metrics (BSDS-style): 1.0 on a perfect prediction, unchanged by shifts within the
tolerance, 0 beyond it, hand-computed partial cases; the exact matching; edge NMS thinning."""

import numpy as np
import pytest
import torch

from segany.evaluation.bsds import boundary_map, image_counts, masks_to_labels, match, summarize
from segany.evaluation.edges import edge_nms, outer_boundary, sobel_magnitude

H, W = 120, 160  # diagonal 200 px -> tolerance 0.0075 * 200 = 1.5 px


def _square_boundary(shift=0):
    m = np.zeros((H, W), bool)
    m[30:90, 40 + shift : 120 + shift] = True
    return boundary_map(m.astype(int))


def _scores(edges, gts):
    return summarize(image_counts(edges.astype(np.float32), gts)[None])


def test_perfect_prediction_scores_one():
    gt = _square_boundary()
    s = _scores(gt, [gt])
    assert s["ODS"] == s["OIS"] == s["AP"] == s["R50"] == pytest.approx(1.0)


def test_shift_within_and_beyond_the_tolerance():
    gt = _square_boundary()
    assert _scores(_square_boundary(1), [gt])["ODS"] == pytest.approx(1.0)  # 1 px <= 1.5 px
    far = _scores(_square_boundary(4), [gt])  # the vertical sides miss
    assert 0 < far["ODS"] < 1
    # the horizontal sides (80 px each) still match after a 4 px shift along them, except 4 px at each
    # end; the vertical sides (60 px each, 4 px away) do not: matched = 2 * (80 - 4 + 1) of 2 * 80 + 2 * 59
    assert far["ODS"] == pytest.approx(2 * 77 / (2 * 80 + 2 * 58), abs=0.02)
    nowhere = np.zeros((H, W), bool)
    nowhere[5, 5:30] = True
    assert _scores(nowhere, [gt])["ODS"] == 0.0


def test_partial_prediction_and_two_annotators():
    gt = np.zeros((H, W), bool)
    gt[20, 10:110] = True
    gt[100, 10:110] = True
    half = np.zeros((H, W), bool)
    half[20, 10:110] = True  # precision 1, recall 1/2 -> F = 2/3
    assert _scores(half, [gt])["ODS"] == pytest.approx(2 / 3)
    # two annotators, one drew only the first line: recall (100 + 100) / (200 + 100), precision 1
    gt2 = np.zeros((H, W), bool)
    gt2[20, 10:110] = True
    c = image_counts(half.astype(np.float32), [gt, gt2])
    assert c[0].tolist() == [200, 300, 100, 100]


def test_matching_is_maximum_cardinality_not_greedy():
    pred = np.zeros((10, 10), bool)
    gt = np.zeros((10, 10), bool)
    pred[5, 4] = pred[5, 5] = True  # p0 (5,4) reaches g0 (5,3) and g1 (5,5) ... greedy p0 -> g1
    gt[5, 3] = gt[5, 6] = True  # would leave p1 (5,5) with nothing: g1 (5,6) is its only one
    matched, n = match(pred, gt, max_dist=1.0)
    assert n == 2 and matched.sum() == 2


def test_soft_map_thresholds_and_ods_vs_ois():
    gt = _square_boundary()
    soft = np.where(gt, 0.8, 0.0).astype(np.float32)
    soft[10, 10:50] = 0.3  # a weak false edge: only thresholds <= .3 include it
    s = _scores(soft, [gt])
    assert s["ODS"] == pytest.approx(1.0) and 0.3 < s["ODS_threshold"] <= 0.8


def test_edge_nms_thins_a_blurred_line_to_its_ridge():
    yy = np.arange(H, dtype=np.float64)[:, None] * np.ones((1, W))
    E = np.exp(-((yy - 60.0) ** 2) / (2 * 3.0**2))  # horizontal ridge at row 60, sigma 3
    thin = edge_nms(E)
    rows = np.nonzero(thin[:, 20:-20].any(1))[0]
    assert rows.tolist() == [60]


def test_sobel_on_the_outer_boundary_only():
    m = torch.zeros(1, 40, 40, dtype=torch.bool)
    m[0, 10:30, 10:30] = True
    prob = torch.where(m, 0.9, 0.1).float()
    band = outer_boundary(m)
    g = sobel_magnitude(prob) * band
    assert band[0, 9:31, 9:31].sum() == 22 * 22 - 18 * 18 and band[0, 20, 20] == 0  # 1 px each side of the contour
    assert g[0, 20, 9] > 0 and g[0, 20, 10] > 0 and g[0, 20, 20] == 0 and g[0, 0, 0] == 0


def test_labels_to_boundaries():
    a = np.zeros((8, 8), bool)
    a[2:5, 2:5] = True
    b = boundary_map(masks_to_labels([a]))
    # marked: the pixel left of / above each change, and the square's own right column and bottom row
    assert b.sum() == 3 + 3 + 3 + 3 - 1  # (4, 4) is both
    assert b[1, 2] and b[4, 2] and b[2, 1] and b[2, 4] and not b[3, 3]
