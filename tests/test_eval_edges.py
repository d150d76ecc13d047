"""Edge metrics (the BSDS500 benchmark, segany/evaluation/bsds.py): 1.0 on a perfect prediction,
unchanged by shifts within the tolerance, 0 beyond it, hand-computed partial cases, a thick
prediction thinned per threshold; edge NMS thinning of the edge map. tests/test_eval_bsds.py checks
the benchmark against the MATLAB reference results."""

import numpy as np
import pytest
import torch

from segany.evaluation.bsds import boundary_map, image_counts, masks_to_labels, summarize
from segany.evaluation.edges import edge_nms, outer_boundary, sobel_magnitude

H, W = 120, 160  # diagonal 200 px -> tolerance 0.0075 * 200 = 1.5 px


def _square_boundary(shift=0):
    m = np.zeros((H, W), bool)
    m[30:90, 40 + shift : 120 + shift] = True
    return boundary_map(m.astype(int))


def _scores(edges, gts):
    return summarize(image_counts(edges.astype(np.float32), gts)[None])


# correspondPixels (the benchmark's C++) draws its sparse outlier graph from a time-seeded generator,
# in MATLAB as here: on these ~300 px maps a run can leave a few matchable pixels unmatched, so the
# hand-computed values are checked to RANDOM = 0.02 (2 %), exact ones where no pixel can match
RANDOM = 0.02


def test_perfect_prediction_scores_one():
    gt = _square_boundary()
    s = _scores(gt, [gt])
    # bwmorph thinning removes 3 of the 279 GT-map pixels (corner pixels of the one-sided boundary),
    # which are then unmatched GT: R = 276 / 279, P = 1
    assert s["ODS"] == pytest.approx(2 * (276 / 279) / (1 + 276 / 279), abs=RANDOM)
    assert s["OIS"] == pytest.approx(s["ODS"], abs=RANDOM) and s["R50"] == pytest.approx(276 / 279, abs=RANDOM)
    # the benchmark's Area_PR needs two distinct recalls (collect_eval_bdry: numel(Ru) > 1, else 0):
    # a map equal at every threshold has one point, so its AP is 0, in MATLAB as here
    assert s["AP"] == 0.0


def test_shift_within_and_beyond_the_tolerance():
    gt = _square_boundary()
    near = _scores(_square_boundary(1), [gt])
    assert near["ODS"] == pytest.approx(1.0, abs=RANDOM)  # 1 px <= 1.5 px
    far = _scores(_square_boundary(4), [gt])  # the vertical sides miss
    # the horizontal sides (80 px each) still match after a 4 px shift along them, except 4 px at each
    # end; the vertical sides (60 px each, 4 px away) do not: matched = 2 * (80 - 4 + 1) of 2 * 80 + 2 * 58
    assert far["ODS"] == pytest.approx(2 * 77 / (2 * 80 + 2 * 58), abs=RANDOM)
    nowhere = np.zeros((H, W), bool)
    nowhere[5, 5:30] = True
    assert _scores(nowhere, [gt])["ODS"] == 0.0


def test_partial_prediction_and_two_annotators():
    gt = np.zeros((H, W), bool)
    gt[20, 10:110] = True
    gt[100, 10:110] = True
    half = np.zeros((H, W), bool)
    half[20, 10:110] = True  # precision 1, recall 1/2 -> F = 2/3
    assert _scores(half, [gt])["ODS"] == pytest.approx(2 / 3, abs=RANDOM)
    # two annotators, one drew only the first line: recall (100 + 100) / (200 + 100), precision 1
    gt2 = np.zeros((H, W), bool)
    gt2[20, 10:110] = True
    c = image_counts(half.astype(np.float32), [gt, gt2])  # (99, 4): the same map at every threshold
    assert (c == c[0]).all() and c[0, 1] == 300 and c[0, 3] == 100
    assert c[0, 0] == pytest.approx(200, abs=4) and c[0, 2] == pytest.approx(100, abs=2)


def test_thick_prediction_is_thinned_at_each_threshold():
    gt = np.zeros((H, W), bool)
    gt[60, 20:140] = True  # 120 px line
    band = np.zeros((H, W), np.float32)
    band[58:63, 20:140] = 0.9  # 5 px thick over it: unthinned, 4 of 5 predicted pixels could not match
    cnt_r, sum_r, cnt_p, sum_p = image_counts(band, [gt], [0.5])[0]
    # bwmorph thinning leaves a 1 px line along the middle row (its ends cut back by a pixel or two
    # at the band's corners), every kept pixel within the 1.5 px tolerance of the GT line
    assert sum_r == 120 and 114 <= sum_p <= 120 and cnt_p / sum_p == pytest.approx(1, abs=RANDOM)
    assert cnt_r == cnt_p  # one-to-one matching
    # thresholds above the band's value: nothing predicted, R = P = 0 (the benchmark's convention)
    assert image_counts(band, [gt], [0.95])[0].tolist() == [0, 120, 0, 0]


def test_soft_map_thresholds_and_ods_vs_ois():
    gt = _square_boundary()
    soft = np.where(gt, 0.8, 0.0).astype(np.float32)
    soft[10, 10:50] = 0.3  # a weak false edge: only thresholds <= .3 include it
    s = _scores(soft, [gt])
    assert s["ODS_precision"] == pytest.approx(1.0, abs=RANDOM) and 0.3 < s["ODS_threshold"] <= 0.8
    low = summarize(image_counts(soft, [gt], [0.2])[None], np.array([0.2]))  # the weak edge in: 40 of 316 px false
    assert low["ODS_precision"] == pytest.approx(276 / 316, abs=RANDOM)


def test_summary_interpolates_like_collect_eval_bdry():
    # two thresholds, one image: R 0.4 -> 0.8, P 1.0 -> 0.5 as t falls; hand-computed:
    # ODS: maxF over the segment between them (100 steps): F(d) = 2 (0.8-0.4d)(0.5+0.5d) / (1.3+0.1d),
    # largest at the step nearest d* (dF/dd = 0), not at either end (F = 0.615, 0.571)
    counts = np.array([[[800, 1000, 500, 1000], [400, 1000, 1000, 1000]]])  # (1, 2, 4) at t = 1/3, 2/3
    s = summarize(counts)
    d = np.linspace(0, 1, 100)  # MATLAB linspace(0, 1): from t = 1/3 (d = 0) to t = 2/3 (d = 1)
    r, p = 0.8 * (1 - d) + 0.4 * d, 0.5 * (1 - d) + 1.0 * d
    f = 2 * p * r / (p + r)
    assert s["ODS"] == pytest.approx(f.max()) and s["ODS"] > 0.64 and s["ODS_recall"] == pytest.approx(r[f.argmax()])
    assert s["OIS"] == pytest.approx(2 * 0.8 * 0.5 / 1.3)  # not interpolated: the better threshold, F 0.615
    # AP: P linear in R between (0.4, 1.0) and (0.8, 0.5), 0 elsewhere, sampled at R = 0, .01, ..., 1, x 0.01
    ri = np.arange(40, 81) / 100
    assert s["AP"] == pytest.approx((1.0 - (ri - 0.4) / 0.4 * 0.5).sum() * 0.01)
    assert s["R50"] == pytest.approx(0.8)  # recall where precision falls to 0.5


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
