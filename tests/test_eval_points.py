"""The points task: click placement on masks whose centre and farthest error point are known
by construction, random first clicks, and the per-dataset / mean bookkeeping."""

import numpy as np
import pytest
import torch

from segany.evaluation import ClickProtocol, center_click, interactive_eval, next_click, random_click
from segany.evaluation.points import points_merge, points_part
from segany.evaluation.protocol import AREA_BINS, original_areas, summarize
from segany.evaluation.registry import mean_over_datasets


def test_center_of_a_square_and_of_a_plus():
    m = np.zeros((31, 31), bool)
    m[5:16, 10:21] = True  # 11x11 square: its centre pixel is (10, 15)
    assert center_click(m) == (10, 15)
    plus = np.zeros((41, 41), bool)
    plus[18:23, 5:36] = True  # a plus of two 5-wide bars crossing at (20, 20):
    plus[5:36, 18:23] = True  # only the crossing is 3 px from every background pixel
    assert center_click(plus) == (20, 20)


def test_farthest_error_point_is_known():
    gt = np.zeros((40, 60), bool)
    gt[5:35, 5:55] = True
    pred = gt.copy()
    pred[5:20, 40:55] = False  # FN: a 15 x 15 square, its deepest pixel is its centre (12, 47)
    pred[0:3, 10:20] = True  # FP outside: 3 rows thick (deepest distance 2)
    y, x, label = next_click(pred, gt)
    assert (y, x, label) == (12, 47, 1)
    pred2 = gt.copy()
    pred2[36:40, 0:60] = True  # FP 4 rows at the image's bottom edge, deeper than...
    pred2[20, 20] = False  # ...a single-pixel FN
    assert next_click(pred2, gt)[2] == 0


def test_random_first_click_is_uniform_in_the_mask():
    m = np.zeros((20, 20), bool)
    m[2:4, 3:8] = True  # 10 pixels
    rng = np.random.default_rng(0)
    hits = np.zeros_like(m, dtype=int)
    for _ in range(2000):
        y, x = random_click(m, rng)
        hits[y, x] += 1
    assert hits[~m].sum() == 0 and hits[m].min() > 140 and hits[m].max() < 260  # 200 expected each
    assert random_click(np.zeros((3, 3), bool), rng) is None
    with pytest.raises(ValueError, match="first_click"):
        ClickProtocol(first_click="middle")


def test_protocol_random_first_click_is_deterministic_and_inside():
    from segany.testing.toy import toy_batch

    b = toy_batch(1, 2, 64)
    calls = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.image_encoder = lambda x: torch.zeros(x.shape[0], 8, 4, 4)
            self.prompt_encoder = self.mask_decoder = self

        def get_dense_pe(self):
            return torch.zeros(1, 8, 4, 4)

        def forward(self, points, boxes, masks):
            calls.append(points[0].clone())
            return points[0], None

        def predict_masks(self, emb, pe, sparse, dense):
            return torch.full((sparse.shape[0], 4, 16, 16), -1.0), torch.zeros(sparse.shape[0], 4)

    p = ClickProtocol(clicks=(1,), first_click="random", seed=3)
    interactive_eval(Probe(), b, p)
    interactive_eval(Probe(), b, p)
    assert torch.equal(calls[0], calls[1])
    for r in range(2):
        x, y = calls[0][r, 0].long().tolist()
        assert b["masks"][0, r, y, x]


def test_merge_over_ranks_and_mean_over_datasets():
    a = {"iou": {"1": [0.2, 0.4], "3": [0.5, 0.7]}, "iou_oracle": {"1": [0.3, 0.5], "3": [0.6, 0.8]}, "num_images": 1}
    b = {"iou": {"1": [0.9], "3": [1.0]}, "iou_oracle": {"1": [0.9], "3": [1.0]}, "num_images": 1}
    d1 = points_merge([a, b])  # per mask over both ranks: (0.2 + 0.4 + 0.9) / 3
    assert d1["miou@1"] == pytest.approx(0.5) and d1["miou@3"] == pytest.approx(2.2 / 3)
    assert d1["num_masks"] == 3 and d1["num_images"] == 2
    d2 = points_merge([{"iou": {"1": [0.1], "3": [0.2]}, "iou_oracle": {"1": [0.1], "3": [0.2]}, "num_images": 1}])
    mean = mean_over_datasets({"a": d1, "b": d2})  # unweighted over datasets, as the paper's 23
    assert mean["miou@1"] == pytest.approx((0.5 + 0.1) / 2) and mean["num_masks"] == 4


def test_area_bins_are_cocoevals():
    from pycocotools.cocoeval import Params

    coco = dict(zip(Params(iouType="segm").areaRngLbl, Params(iouType="segm").areaRng))
    for name, (lo, hi) in AREA_BINS.items():  # COCOeval's closed ranges; ours [lo, hi) so no mask is in two
        assert coco[name][0] == lo and (coco[name][1] == hi or hi == float("inf"))


def test_summarize_by_object_size():
    area = [10.0, 1023.5, 1024.0, 9215.0, 9216.0, 5e4]  # small, small, medium, medium, large, large
    iou = {1: [0.1, 0.3, 0.5, 0.7, 0.8, 1.0], 2: [0.2, 0.4, 0.6, 0.8, 0.9, 1.0]}
    oracle = {k: [min(v + 0.05, 1.0) for v in vs] for k, vs in iou.items()}
    m = summarize({"iou": iou, "iou_oracle": oracle, "area": area})
    assert m["miou@1"] == pytest.approx(3.4 / 6) and m["num_masks"] == 6
    assert m["miou@1_small"] == pytest.approx(0.2) and m["miou@1_medium"] == pytest.approx(0.6)
    assert m["miou@1_large"] == pytest.approx(0.9) and m["miou@2_small"] == pytest.approx(0.3)
    assert m["miou_oracle@1_large"] == pytest.approx((0.85 + 1.0) / 2)
    assert (m["num_masks_small"], m["num_masks_medium"], m["num_masks_large"]) == (2, 2, 2)
    only_small = summarize({"iou": {1: [0.4]}, "iou_oracle": {1: [0.5]}, "area": [3.0]})
    assert np.isnan(only_small["miou@1_large"]) and only_small["num_masks_large"] == 0
    assert "miou@1_small" not in summarize({"iou": iou, "iou_oracle": oracle})  # no areas: overall only


def test_points_part_bins_masks_by_their_original_area():
    """Masks of known areas under a model that predicts the whole image: the IoU of each is
    its area / the input frame's area, and its original area is 4x its input-frame area
    (a 128 x 96 image at 64 x 48)."""
    S, (h, w) = 64, (48, 64)  # input frame 48 x 64: 3072 pixels
    masks = torch.zeros(1, 4, S, S, dtype=torch.bool)
    masks[0, 0, 10:15, 10:11] = True  # 5 px -> 20 original: small
    masks[0, 1, 0:15, 0:20] = True  # 300 px -> 1200: medium
    masks[0, 2, :h, :w] = True  # 3072 px -> 12288: large
    batch = {
        "image": torch.zeros(1, 3, S, S),
        "original_size": torch.tensor([[96, 128]]),
        "input_size": torch.tensor([[h, w]]),
        "masks": masks,
        "valid": torch.tensor([[True, True, True, False]]),
        "image_id": ["a"],
    }
    assert original_areas(batch)[0].tolist() == [20.0, 1200.0, 12288.0, 0.0]

    class Everything(torch.nn.Module):  # logits +1 everywhere: the prediction is the input frame
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

    class DM:
        class val_dataset:
            set_topology = staticmethod(lambda rank, world: None)

        val_dataloader = staticmethod(lambda: [batch])

    part = points_part(Everything(), DM, ClickProtocol(clicks=(1,)), "cpu")
    assert part["area"] == [20.0, 1200.0, 12288.0]
    m = points_merge([part])
    assert m["miou@1_small"] == pytest.approx(5 / 3072) and m["miou@1_medium"] == pytest.approx(300 / 3072)
    assert m["miou@1_large"] == pytest.approx(1.0) and m["num_masks_small"] == 1 and m["num_masks"] == 3
    other = points_merge([dict(part, area=[12288.0] * 3)])  # a second dataset without small masks
    mean = mean_over_datasets({"a": m, "b": other})
    assert mean["miou@1_small"] == pytest.approx(5 / 3072)  # over the datasets that have small masks
    assert mean["num_masks_large"] == 4 and mean["miou@1"] == pytest.approx(m["miou@1"])


def test_mean_over_datasets_averages_defined_floats_and_sums_counts():
    a = {"miou@1": 0.2, "AR_s@1000": float("nan"), "num_masks": 3, "curve": {"recall": [0.0, 1.0]}}
    b = {"miou@1": 0.6, "AR_s@1000": 0.5, "num_masks": 5, "curve": {"recall": [0.5]}}
    c = {"miou@1": float("nan"), "AR_s@1000": float("nan"), "num_masks": 0, "curve": {"recall": []}}
    mean = mean_over_datasets({"a": a, "b": b, "c": c})
    assert mean["miou@1"] == pytest.approx(0.4) and mean["AR_s@1000"] == 0.5  # NaN: not defined there
    assert mean["num_masks"] == 8 and "curve" not in mean  # counts summed; a curve has no mean
    assert np.isnan(mean_over_datasets({"c": c})["miou@1"])
