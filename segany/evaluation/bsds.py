"""The BSDS500 boundary benchmark (Arbelaez et al., TPAMI 2011; the SAM paper's edge
evaluation), as the MATLAB ``boundaryBench`` computes it: ODS, OIS, AP and R50 of a soft edge
map against one or more human boundary maps per image.

Per image (``image_counts``, the MATLAB ``evaluation_bdry_image``): at each threshold t
(``linspace(1/(n+1), 1 - 1/(n+1), n)``, n = 99), the map ``E >= t`` is thinned to one pixel
(``bwmorph(..., 'thin', inf)``) and matched against each annotator's boundaries with
``correspondPixels`` (a min-cost assignment; pixels match within 0.0075 x the image diagonal).
cntR / sumR: matched / all GT pixels, summed over annotators; cntP / sumP: predicted pixels
matched in at least one annotator's map / all predicted pixels. This is pyEdgeEval's
``evaluate_boundaries_threshold_multiple_gts``: the benchmark's own C++ ``correspondPixels``
compiled, and a port of ``bwmorph`` thinning (the Lam-Lee-Suen algorithm of
``skimage.morphology.thin``; the two agree pixel for pixel on the benchmark's sample).

Over a dataset (``summarize``, the MATLAB ``collect_eval_bdry``): ODS, OIS, AP, R50 from the
images' counts, with R = cntR / (sumR + (sumR == 0)), P likewise (0 where nothing is predicted).
"""

from __future__ import annotations

import contextlib
import io
from typing import Sequence

import numpy as np

MAX_DIST = 0.0075  # tolerance, fraction of the image diagonal (BSDS default)
N_THRESH = 99


def thresholds(n: int = N_THRESH) -> np.ndarray:
    return np.linspace(1.0 / (n + 1), 1.0 - 1.0 / (n + 1), n)


def boundary_map(labels: np.ndarray) -> np.ndarray:
    """(H, W) int label map -> (H, W) bool: pixels whose label differs from the pixel to
    their right or below (a 1-pixel boundary between every pair of regions)."""
    b = np.zeros(labels.shape, bool)
    b[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    b[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return b


def masks_to_labels(masks: Sequence[np.ndarray]) -> np.ndarray:
    """Instance masks (H, W) bool -> label map (0 = background), larger masks painted first so
    that a small object on a larger one stays visible."""
    labels = np.zeros(masks[0].shape, np.int32)
    for i in sorted(range(len(masks)), key=lambda i: -int(masks[i].sum())):
        labels[masks[i]] = i + 1
    return labels


def _evaluate_boundaries():
    """pyEdgeEval's per-image evaluation (imported here: its package prints a line about
    pymatreader on import, swallowed)."""
    with contextlib.redirect_stdout(io.StringIO()):
        from pyEdgeEval.common.binary_label.evaluate_boundaries import evaluate_boundaries_threshold_multiple_gts
    return evaluate_boundaries_threshold_multiple_gts


def image_counts(
    edges: np.ndarray, gts: Sequence[np.ndarray], thr: np.ndarray = None, max_dist_frac: float = MAX_DIST
) -> np.ndarray:
    """(H, W) edge map in [0, 1] and its annotators' boundary maps -> (T, 4) int64 counts per
    threshold: cntR, sumR (matched / all GT pixels, summed over annotators), cntP, sumP
    (matched / all pixels of the thinned prediction). Thresholds that select the same pixels
    share their counts (computed once)."""
    thr = thresholds() if thr is None else np.asarray(thr, np.float64)
    E = np.asarray(edges, np.float64)
    H, W = E.shape
    if not gts:
        raise ValueError("image_counts: no ground-truth boundary map")
    bad = [g.shape for g in gts if g.shape != (H, W)]
    if bad:
        raise ValueError(f"edge map is {H}x{W}, a ground-truth map is {bad[0]}")
    n_on = E.size - np.searchsorted(np.sort(E, axis=None), thr, side="left")  # (T,) pixels E >= t
    _, first, inverse = np.unique(n_on, return_index=True, return_inverse=True)  # same count <=> same set
    c = _evaluate_boundaries()(thr[first], E, [np.asarray(g, bool) for g in gts], max_dist_frac, apply_thinning=True)
    return np.rint(np.stack(c, 1)).astype(np.int64)[inverse.ravel()]  # (T, 4)


def _rpf(c: np.ndarray) -> tuple:
    """counts (..., 4) -> R, P, F as the benchmark computes them (0 where undefined)."""
    c = c.astype(np.float64)
    r = c[..., 0] / (c[..., 1] + (c[..., 1] == 0))
    p = c[..., 2] / (c[..., 3] + (c[..., 3] == 0))
    return r, p, _f(r, p)


def _f(r, p):
    return 2 * p * r / (p + r + ((p + r) == 0))


def max_f(thr: np.ndarray, r: np.ndarray, p: np.ndarray) -> tuple:
    """The benchmark's ``maxF``: the best F on the PR curve with R, P and t interpolated
    linearly between neighbouring thresholds (``linspace(0, 1)``: 100 steps each) ->
    (t, R, P, F). pyEdgeEval's ``interpolated_max_scores`` steps 101 times per interval, so
    its optimum can differ in the last digits; this is the MATLAB loop, vectorised."""
    d = np.linspace(0, 1, 100)[None]  # (1, 100)

    def lerp(v):  # (T,) -> (1 + (T-1) * 100,): the first point, then each interval's 100 steps, in MATLAB's order
        return np.concatenate([v[:1], (v[1:, None] * d + v[:-1, None] * (1 - d)).ravel()])

    t, ri, pi = lerp(thr), lerp(r), lerp(p)
    f = _f(ri, pi)
    best = int(np.argmax(f))  # the first maximum: the loop replaces only on a strictly larger F
    return float(t[best]), float(ri[best]), float(pi[best]), float(f[best])


def summarize(counts: np.ndarray, thr: np.ndarray = None) -> dict:
    """counts (I images, T thresholds, 4) -> the benchmark's summary.

    Hand-written after ``collect_eval_bdry`` (BSR/bench/benchmarks) and, for R50, Dollar's
    ``edgesEvalDir`` (the SAM paper's metric set): pyEdgeEval's ``calculate_metrics`` cannot be
    called on counts — it runs its own per-sample evaluation from files through its
    multiprocessing progress bar, so the counts of sharded ranks cannot be merged into it — and
    it has no R50.

    - ODS: ``max_f`` of the dataset-wide R, P (counts summed over images);
    - OIS: counts of each image at its best threshold (first maximum of F, not interpolated),
      summed, then F;
    - AP: ``Area_PR``: P interpolated linearly in R (one point per distinct R, its first
      threshold) at R = 0, .01, ..., 1, 0 outside the reached recall range, summed x 0.01;
    - R50: recall at precision 0.5 (``edgesEvalDir``: R interpolated in P over the distinct P of
      the distinct-R points, at max(lowest P, 0.5)); 0 where precision never reaches 0.5
      (the toolbox gives NaN).
    """
    counts = np.asarray(counts)
    thr = thresholds(counts.shape[1]) if thr is None else np.asarray(thr, np.float64)
    r, p, f = _rpf(counts.sum(0))  # (T,) dataset-wide
    ods_t, ods_r, ods_p, ods_f = max_f(thr, r, p)
    _, _, f_img = _rpf(counts)  # (I, T)
    per_image_best = counts[np.arange(len(counts)), f_img.argmax(1)]  # (I, 4)
    ois_r, ois_p, ois_f = (float(v) for v in _rpf(per_image_best.sum(0)))
    ru, iu = np.unique(r, return_index=True)
    ap = float(np.interp(np.linspace(0, 1, 101), ru, p[iu], left=0.0, right=0.0).sum() * 0.01) if len(ru) > 1 else 0.0
    return {
        "ODS": ods_f,
        "OIS": ois_f,
        "AP": ap,
        "R50": _r50(r, p),
        "ODS_threshold": ods_t,
        "ODS_recall": ods_r,
        "ODS_precision": ods_p,
        "OIS_recall": ois_r,
        "OIS_precision": ois_p,
        "curve": {"recall": r.tolist(), "precision": p.tolist(), "threshold": thr.tolist()},
    }


def _r50(r: np.ndarray, p: np.ndarray) -> float:
    """edgesEvalDir: ``[~,k]=unique(R); k=k(end:-1:1); [~,o]=unique(P(k));
    R50=interp1(P(o),R(o),max(P(o(1)),.5))`` (a single point: its R)."""
    _, k = np.unique(r, return_index=True)
    k = k[::-1]
    rk, pk = r[k], p[k]
    pu, o = np.unique(pk, return_index=True)
    if len(k) <= 1:
        return float(rk[o[0]])
    at = max(pu[0], 0.5)
    return float(np.interp(at, pu, rk[o])) if at <= pu[-1] else 0.0
