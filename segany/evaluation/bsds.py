"""Boundary benchmark in the way of BSDS500 (Arbelaez et al. 2011; the SAM paper's edge
evaluation): ODS, OIS, AP and R50 of a soft edge map against one or more human boundary
maps per image.

Per threshold t of the edge map (99 evenly spaced in (0, 1)): the binary map E >= t is
matched against each ground-truth boundary map; a predicted and a GT pixel may match when
they lie within ``max_dist = 0.0075 x image diagonal`` of each other, each pixel at most
once. Recall counts matched GT pixels over all GT maps; precision counts predicted pixels
matched in at least one GT map.

Matching: BSDS's ``correspondPixels`` solves a min-cost assignment whose outlier cost makes
it maximise the number of matches first; the counts only depend on that number, which is
computed here exactly as a maximum-cardinality bipartite matching (Hopcroft-Karp,
scipy.sparse.csgraph) on the graph of pixel pairs within max_dist.

Differences from the MATLAB benchmark, stated: the edge map is not re-thinned per threshold
(edges.py thins it once with edge NMS before); ODS / OIS take the best of the 99 thresholds
without BSDS's interpolation between them; AP is the area under the precision envelope
sampled at recall 0, .01, ..., 1 (BSDS interpolates P(R) linearly and leaves recall it does
not reach out); R50 is the largest recall reached with precision >= 0.5.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching

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


def match(pred: np.ndarray, gt: np.ndarray, max_dist: float) -> tuple:
    """Maximum matching of predicted and GT boundary pixels at distance <= max_dist.
    pred, gt: (H, W) bool -> (matched pred (H, W) bool, matched GT pixel count)."""
    H, W = pred.shape
    matched = np.zeros_like(pred)
    if not pred.any() or not gt.any():
        return matched, 0
    pid = np.full((H, W), -1, np.int64)
    gid = np.full((H, W), -1, np.int64)
    py, px = np.nonzero(pred)
    gy, gx = np.nonzero(gt)
    pid[py, px] = np.arange(len(py))
    gid[gy, gx] = np.arange(len(gy))
    r = int(np.floor(max_dist))
    rows, cols = [], []
    for dy in range(-r, r + 1):  # every offset within the tolerance disc
        for dx in range(-r, r + 1):
            if dy * dy + dx * dx > max_dist * max_dist:
                continue
            y, x = py + dy, px + dx
            ok = (y >= 0) & (y < H) & (x >= 0) & (x < W)
            g = np.full(len(py), -1, np.int64)
            g[ok] = gid[y[ok], x[ok]]
            hit = g >= 0
            rows.append(np.nonzero(hit)[0])
            cols.append(g[hit])
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    graph = csr_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(len(py), len(gy)))
    m = maximum_bipartite_matching(graph, perm_type="column")  # (n pred,) matched GT index or -1
    ok = m >= 0
    matched[py[ok], px[ok]] = True
    return matched, int(ok.sum())


def image_counts(
    edges: np.ndarray, gts: Sequence[np.ndarray], thr: np.ndarray = None, max_dist_frac: float = MAX_DIST
) -> np.ndarray:
    """(H, W) edge map in [0, 1] and its GT boundary maps -> (T, 4) counts per threshold:
    matched GT pixels, GT pixels (both summed over GT maps), matched predicted pixels,
    predicted pixels."""
    thr = thresholds() if thr is None else np.asarray(thr)
    H, W = edges.shape
    if any(g.shape != (H, W) for g in gts):
        raise ValueError(f"edge map is {H}x{W}, a ground-truth map is not")
    max_dist = max_dist_frac * float(np.hypot(H, W))
    out = np.zeros((len(thr), 4), np.int64)
    for t, th in enumerate(thr):
        pred = edges >= th
        acc = np.zeros_like(pred)
        for g in gts:
            mp, n_gt = match(pred, g, max_dist)
            acc |= mp
            out[t, 0] += n_gt
            out[t, 1] += int(g.sum())
        out[t, 2] = int(acc.sum())
        out[t, 3] = int(pred.sum())
    return out


def _prf(c: np.ndarray) -> tuple:
    """counts (..., 4) -> recall, precision, F (0 where undefined)."""
    c = c.astype(np.float64)
    r = np.where(c[..., 1] > 0, c[..., 0] / np.maximum(c[..., 1], 1), 0.0)
    p = np.where(c[..., 3] > 0, c[..., 2] / np.maximum(c[..., 3], 1), 1.0)  # nothing predicted: precision 1
    f = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0.0)
    return r, p, f


def summarize(counts: np.ndarray, thr: np.ndarray = None) -> dict:
    """counts (I images, T thresholds, 4) -> ODS, OIS, AP, R50, the ODS threshold and the
    dataset PR curve."""
    thr = thresholds(counts.shape[1]) if thr is None else np.asarray(thr)
    r, p, f = _prf(counts.sum(0))  # (T,) dataset-wide at each threshold
    best = int(f.argmax())
    _, _, f_img = _prf(counts)  # (I, T)
    per_image_best = counts[np.arange(len(counts)), f_img.argmax(1)]  # (I, 4) counts at each image's best
    _, _, ois = _prf(per_image_best.sum(0))
    grid = np.linspace(0, 1, 101)
    env = np.array([p[r >= g].max() if (r >= g).any() else 0.0 for g in grid])
    ap = float(env.mean())
    r50 = float(r[p >= 0.5].max()) if (p >= 0.5).any() else 0.0
    return {
        "ODS": float(f[best]),
        "OIS": float(ois),
        "AP": ap,
        "R50": r50,
        "ODS_threshold": float(thr[best]),
        "curve": {"recall": r.tolist(), "precision": p.tolist(), "threshold": thr.tolist()},
    }


def load_bsds_ground_truth(path: str) -> list:
    """BSDS500 groundTruth/<split>/<id>.mat -> list of (H, W) bool boundary maps, one per annotator."""
    from scipy.io import loadmat

    try:
        gt = loadmat(path)["groundTruth"]
    except (KeyError, ValueError, OSError) as exc:
        raise ValueError(f"{path}: not a BSDS groundTruth .mat ({exc})") from None
    return [np.asarray(gt[0, i]["Boundaries"][0, 0], bool) for i in range(gt.shape[1])]
