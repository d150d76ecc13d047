"""Unit tests of segany.inference.amg_utils against independent truths
(pycocotools, hand-computed values, brute-force numpy)."""

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from segany.data.decode import decode_mask
from segany.inference import amg_utils as U


def _random_masks(n=12, h=23, w=31, seed=0):
    rng = np.random.default_rng(seed)
    masks = rng.random((n, h, w)) < rng.random((n, 1, 1))
    masks[0] = False  # empty
    masks[1] = True  # full
    masks[2] = False
    masks[2, 0, 0] = True  # single pixel at the first RLE position
    masks[3] = False
    masks[3, -1, -1] = True  # single pixel at the last RLE position
    return masks


# ----------------------------------------------------------------- grids


def test_point_grid_hand_values():
    g = U.build_point_grid(4)
    c = [0.125, 0.375, 0.625, 0.875]
    expected = np.array([[x, y] for y in c for x in c])  # x varies fastest
    assert g.shape == (16, 2) and g.dtype == np.float64
    np.testing.assert_allclose(g, expected, rtol=0, atol=1e-15)


def test_all_layer_point_grids_sizes():
    grids = U.build_all_layer_point_grids(16, 2, 2)
    assert [len(g) for g in grids] == [256, 64, 16]
    grids = U.build_all_layer_point_grids(10, 1, 3)  # int(10 / 3) = 3
    assert [len(g) for g in grids] == [100, 9]


# ----------------------------------------------------------------- crops


def test_crop_boxes_one_layer_hand_computed():
    # short side 200: overlap = int(512/1500 * 200) = 68
    # crop_w = ceil((300 + 68) / 2) = 184, crop_h = ceil((200 + 68) / 2) = 134
    boxes, layers = U.generate_crop_boxes((200, 300), 1, 512 / 1500)
    assert boxes == [
        [0, 0, 300, 200],
        [0, 0, 184, 134],
        [0, 66, 184, 200],
        [116, 0, 300, 134],
        [116, 66, 300, 200],
    ]
    assert layers == [0, 1, 1, 1, 1]


def test_crop_boxes_two_layers_hand_computed():
    # layer 2: overlap = int(512/1500 * 200 * 0.5) = 34
    # crop_w = ceil((300 + 3*34) / 4) = 101 (step 67), crop_h = ceil((200 + 102) / 4) = 76 (step 42)
    boxes, layers = U.generate_crop_boxes((200, 300), 2, 512 / 1500)
    assert len(boxes) == 1 + 4 + 16 and layers == [0] + [1] * 4 + [2] * 16
    x_spans = [(0, 101), (67, 168), (134, 235), (201, 300)]
    y_spans = [(0, 76), (42, 118), (84, 160), (126, 200)]
    expected = [[x0, y0, x1, y1] for (x0, x1) in x_spans for (y0, y1) in y_spans]
    assert boxes[5:] == expected


@pytest.mark.parametrize("size", [(200, 300), (301, 157), (1500, 2250), (64, 64)])
@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_crop_boxes_cover_image(size, n_layers):
    boxes, layers = U.generate_crop_boxes(size, n_layers, 512 / 1500)
    h, w = size
    for layer in range(1, n_layers + 1):
        cover = np.zeros((h, w), bool)
        layer_boxes = [b for b, l in zip(boxes, layers) if l == layer]
        assert len(layer_boxes) == 4**layer
        for x0, y0, x1, y1 in layer_boxes:
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            cover[y0:y1, x0:x1] = True
        assert cover.all()


def test_uncrop_helpers():
    crop = [10, 20, 40, 60]
    boxes = torch.tensor([[0, 0, 5, 5], [1, 2, 3, 4]])
    assert U.uncrop_boxes_xyxy(boxes, crop).tolist() == [[10, 20, 15, 25], [11, 22, 13, 24]]
    pts = torch.tensor([[0.5, 1.5]], dtype=torch.float64)
    assert U.uncrop_points(pts, crop).tolist() == [[10.5, 21.5]]
    m = torch.ones(2, 40, 30, dtype=torch.bool)
    full = U.uncrop_masks(m, crop, 100, 50)
    assert full.shape == (2, 100, 50)
    assert full[:, 20:60, 10:40].all() and full.sum() == m.sum()
    assert U.uncrop_masks(m, [0, 0, 30, 40], 40, 30) is m


def test_is_box_near_crop_edge_hand():
    crop = [100, 0, 200, 100]  # crop of a 200 x 100 image; left edge x=100 is inner
    orig = [0, 0, 200, 100]
    boxes = torch.tensor(
        [
            [5, 30, 50, 60],  # x0 = 105 near inner left edge -> True
            [30, 30, 60, 60],  # interior -> False
            [30, 0, 60, 60],  # touches top, which is also the image edge -> False
            [30, 30, 99, 99],  # touches right/bottom image edges -> False
            [21, 30, 60, 60],  # x0 = 121: 21 px away, beyond atol 20 -> False
            [20, 30, 60, 60],  # exactly atol -> True
        ]
    )
    assert U.is_box_near_crop_edge(boxes, crop, orig).tolist() == [True, False, False, False, False, True]


# ----------------------------------------------------------------- scores / boxes


def test_stability_score_hand():
    logits = torch.full((2, 4, 5), -5.0)
    logits[0, :2] = 3.0  # 10 px above +1
    logits[0, 2, :2] = 0.5  # 2 px in (-1, 1]
    logits[1, 0, 0] = 0.0  # nothing above +1, 1 px above -1
    s = U.calculate_stability_score(logits, 0.0, 1.0)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, torch.tensor([10 / 12, 0.0]))


@pytest.mark.parametrize("shape", [(3, 7, 5), (2, 4, 33, 97), (0, 10, 10), (2, 128, 2), (1, 300, 200)])
def test_count_true_matches_numpy(shape):
    """uint8 run sums then int32: the exact count, whether or not H*W is a multiple of the run,
    and past 255 per run row (all-True masks)."""
    masks = torch.from_numpy(np.random.default_rng(0).random(shape) > 0.3)
    expected = masks.numpy().sum(axis=(-2, -1))
    np.testing.assert_array_equal(U.count_true(masks).numpy(), expected)
    assert U.count_true(masks).dtype == torch.int32
    full = torch.ones(2, 1000, 999, dtype=torch.bool)
    assert U.count_true(full).tolist() == [999000, 999000]


def test_batched_mask_to_box_bruteforce():
    masks = _random_masks()
    boxes = U.batched_mask_to_box(torch.from_numpy(masks))
    assert boxes.dtype == torch.long and boxes.shape == (len(masks), 4)
    for m, b in zip(masks, boxes.tolist()):
        ys, xs = np.nonzero(m)
        expected = [0, 0, 0, 0] if len(xs) == 0 else [xs.min(), ys.min(), xs.max(), ys.max()]
        assert b == expected
    nested = U.batched_mask_to_box(torch.from_numpy(masks[:6]).reshape(2, 3, 23, 31))
    assert nested.shape == (2, 3, 4) and torch.equal(nested.reshape(6, 4), boxes[:6])
    assert U.batched_mask_to_box(torch.zeros(0, 5, 5, dtype=torch.bool)).shape == (0, 4)


def test_box_xyxy_to_xywh():
    assert U.box_xyxy_to_xywh(torch.tensor([3, 4, 10, 20])).tolist() == [3, 4, 7, 16]
    assert U.box_xyxy_to_xywh(np.array([[1, 1, 2, 5]])).tolist() == [[1, 1, 1, 4]]


def test_batch_iterator():
    a, b = list(range(7)), np.arange(7) * 2
    batches = list(U.batch_iterator(3, a, b))
    assert [x for x, _ in batches] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [y.tolist() for _, y in batches] == [[0, 2, 4], [6, 8, 10], [12]]
    with pytest.raises(ValueError):
        list(U.batch_iterator(3, a, b[:3]))


# ----------------------------------------------------------------- RLE


def test_rle_matches_pycocotools():
    masks = _random_masks()
    h, w = masks.shape[1:]
    rles = U.mask_to_rle_pytorch(torch.from_numpy(masks))
    assert len(rles) == len(masks)
    for m, rle in zip(masks, rles):
        assert rle["size"] == [h, w]
        assert sum(rle["counts"]) == h * w
        ref = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        ours = mask_utils.frPyObjects(rle, h, w)
        assert ours["counts"] == ref["counts"]  # identical compressed RLE
        assert U.area_from_rle(rle) == int(mask_utils.area(ref)) == int(m.sum())
        np.testing.assert_array_equal(mask_utils.decode(ours).astype(bool), m)
        decoded = decode_mask(rle)  # the package's one RLE decode, on the mask generator's RLEs
        assert decoded.dtype == bool and decoded.flags.c_contiguous
        np.testing.assert_array_equal(decoded, m)


def test_rle_empty_batch():
    assert U.mask_to_rle_pytorch(torch.zeros(0, 4, 4, dtype=torch.bool)) == []


def test_coco_encode_rle():
    masks = _random_masks(n=5, seed=1)
    for m, rle in zip(masks, U.mask_to_rle_pytorch(torch.from_numpy(masks))):
        coco = U.coco_encode_rle(rle)
        assert isinstance(coco["counts"], str)
        json.dumps(coco)
        ref = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        assert coco["counts"] == ref["counts"].decode()
        assert list(coco["size"]) == list(m.shape)
        dec = mask_utils.decode({"size": coco["size"], "counts": coco["counts"].encode()})
        np.testing.assert_array_equal(dec.astype(bool), m)


# ----------------------------------------------------------------- small regions


def _blob_image():
    m = np.zeros((40, 40), bool)
    m[5:30, 5:30] = True
    m[10:12, 10:12] = False  # 4 px hole
    m[15:25, 15:25] = False  # 100 px hole
    m[34:36, 34:36] = True  # 4 px island
    return m


def test_remove_small_regions_holes():
    m = _blob_image()
    out, changed = U.remove_small_regions(m, 10, "holes")
    assert changed
    expected = m.copy()
    expected[10:12, 10:12] = True
    np.testing.assert_array_equal(out, expected)
    out, changed = U.remove_small_regions(m, 3, "holes")
    assert not changed and out is m


def test_remove_small_regions_islands():
    m = _blob_image()
    out, changed = U.remove_small_regions(m, 10, "islands")
    assert changed
    expected = m.copy()
    expected[34:36, 34:36] = False
    np.testing.assert_array_equal(out, expected)
    # every island small -> the largest one survives
    small = np.zeros((20, 20), bool)
    small[1:3, 1:3] = True  # 4 px
    small[10:13, 10:13] = True  # 9 px
    out, changed = U.remove_small_regions(small, 50, "islands")
    assert changed
    expected = np.zeros_like(small)
    expected[10:13, 10:13] = True
    np.testing.assert_array_equal(out, expected)


def test_remove_small_regions_diagonal_is_connected():
    m = np.zeros((10, 10), bool)
    m[2, 2] = m[3, 3] = m[4, 4] = True  # 8-connected: one 3 px region
    out, changed = U.remove_small_regions(m, 3, "islands")
    assert not changed
    out, changed = U.remove_small_regions(m, 4, "islands")
    assert changed and out.sum() == 3  # single region kept as the largest
