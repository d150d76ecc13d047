"""RLE parsing / checking / resampling against pycocotools and cv2 as independent truths."""

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from segany.data.formats import rle


def _random_masks(rng, h, w, n):
    masks = (rng.random((h, w, n)) < rng.random()).astype(np.uint8)
    masks[..., 0] = 0  # empty
    if n > 1:
        masks[..., 1] = 1  # full (starts with foreground: first run is 0)
    for k in range(2, n, 2):  # blobs: long runs across columns
        blob = np.zeros((h, w), np.uint8)
        cv2.circle(blob, (int(rng.integers(w)), int(rng.integers(h))), int(rng.integers(1, 9)), 1, -1)
        masks[..., k] = blob
    return np.asfortranarray(masks)


def test_parse_matches_pycocotools():
    rng = np.random.default_rng(0)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(1, 30, 2))
        masks = _random_masks(rng, h, w, 6)
        enc = mask_utils.encode(masks)
        parsed = rle.parse([e["counts"].decode() for e in enc], [h] * 6, [w] * 6)
        assert parsed.valid.all()
        np.testing.assert_array_equal(parsed.area, mask_utils.area(enc))
        for i in range(6):
            runs = parsed.runs(i)
            dense = np.repeat(np.arange(len(runs)) % 2, runs).reshape(w, h).T  # column-major runs
            np.testing.assert_array_equal(dense, masks[..., i])


def test_parse_large_counts_and_deltas():
    # long runs need several 5-bit groups and negative deltas: SA-1B-sized masks
    m = np.zeros((1500, 2250), np.uint8)
    cv2.ellipse(m, (1000, 700), (900, 500), 30, 0, 360, 1, -1)
    m[:, :3] = 1
    enc = mask_utils.encode(np.asfortranarray(m))
    parsed = rle.parse([enc["counts"]], [1500], [2250])
    assert parsed.valid.all() and parsed.area[0] == m.sum()


@pytest.mark.parametrize(
    "counts,why",
    [
        (b"000", "runs sum to 0, not h*w"),
        (b"", "empty"),
        (b"1\x7f", "character outside the alphabet"),
        (b"PP", "string ends inside a value (continuation bit set)"),
        (b"0;", "negative run"),
    ],
)
def test_parse_rejects_invalid(counts, why):
    good = mask_utils.encode(np.asfortranarray(np.ones((10, 10), np.uint8)))["counts"]
    parsed = rle.parse([good, counts, good], [10] * 3, [10] * 3)
    assert parsed.valid.tolist() == [True, False, True], why
    assert parsed.area[1] == 0


def test_parse_rejects_size_mismatch():
    enc = mask_utils.encode(np.asfortranarray(np.ones((10, 10), np.uint8)))["counts"]
    assert not rle.parse([enc], [10], [11]).valid[0]
    assert not rle.parse([enc + b"1"], [10], [10]).valid[0]  # one run too many


def _reference(masks, rows, cols):
    return masks[rows][:, cols].transpose(2, 0, 1)


def test_resample_equals_dense_indexing_and_boxes():
    rng = np.random.default_rng(1)
    for trial in range(60):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        masks = _random_masks(rng, h, w, 5)
        parsed = rle.parse([e["counts"] for e in mask_utils.encode(masks)], [h] * 5, [w] * 5)
        rows = np.sort(rng.integers(0, h, int(rng.integers(1, 50))))
        cols = np.sort(rng.integers(0, w, int(rng.integers(1, 50))))  # repeats: the upscaling path
        sel = [4, 1, 0, 2]
        rs = rle.resample(parsed, sel, h, w, rows, cols)
        ref = _reference(masks[..., sel], rows, cols)
        dense = rs.paint(np.arange(len(sel))).transpose(0, 2, 1)
        np.testing.assert_array_equal(dense, ref)
        for i in range(len(sel)):
            ys, xs = np.nonzero(ref[i])
            assert (rs.area[i] > 0) == (len(ys) > 0)
            expect = [xs.min(), ys.min(), xs.max(), ys.max()] if len(ys) else [0, 0, 0, 0]
            assert rs.boxes[i].tolist() == expect, (trial, i)


@pytest.mark.parametrize("h,w,nh,nw", [(150, 225, 68, 102), (30, 20, 64, 43), (97, 61, 97, 61)])
def test_resample_is_pixel_centre_nearest(h, w, nh, nw):
    """Same sampling as cv2's INTER_NEAREST_EXACT (PIL's nearest): an independent truth."""
    rng = np.random.default_rng(2)
    planes = [np.zeros((h, w), np.uint8) for _ in range(3)]
    for k, m in enumerate(planes):
        cv2.ellipse(m, (int(rng.integers(w)), int(rng.integers(h))), (w // 4, h // 5), 20.0 * k, 0, 360, 1, -1)
    masks = np.asfortranarray(np.stack(planes, -1))
    parsed = rle.parse([e["counts"] for e in mask_utils.encode(masks)], [h] * 3, [w] * 3)
    rs = rle.resample(parsed, [0, 1, 2], h, w, rle.sample_grid(h, nh, nh / h), rle.sample_grid(w, nw, nw / w))
    got = rs.paint([0, 1, 2]).transpose(0, 2, 1)
    # an output centre exactly on a source pixel border may take either side (cv2's fixed
    # point picks one or the other): compare everywhere else
    tie_rows = ((2 * np.arange(nh) + 1) * h) % (2 * nh) == 0
    tie_cols = ((2 * np.arange(nw) + 1) * w) % (2 * nw) == 0
    for k in range(3):
        expect = cv2.resize(np.ascontiguousarray(masks[..., k]), (nw, nh), interpolation=cv2.INTER_NEAREST_EXACT)
        np.testing.assert_array_equal(got[k][~tie_rows][:, ~tie_cols], expect[~tie_rows][:, ~tie_cols])
