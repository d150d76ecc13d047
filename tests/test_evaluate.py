"""The single-point protocol: click placement against scipy's distance transform, and the
mIoU bookkeeping with a scripted model."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import distance_transform_edt

from segany.evaluation import ClickProtocol, center_click, interactive_eval, next_click, summarize
from segany.testing.toy import toy_batch


def _edt(region):
    return distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]


def test_center_click_is_the_distance_transform_maximum():
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = np.zeros((40, 50), bool)
        y0, x0 = rng.integers(0, 20, 2)
        m[y0 : y0 + rng.integers(3, 20), x0 : x0 + rng.integers(3, 30)] = True
        y, x = center_click(m)
        d = _edt(m)
        assert m[y, x] and d[y, x] == pytest.approx(d.max())
    # the image border is a boundary: a mask touching it has its centre pushed inwards
    m = np.zeros((20, 20), bool)
    m[:, :10] = True
    assert center_click(m)[1] == 4 or center_click(m)[1] == 5
    assert center_click(np.zeros((5, 5), bool)) is None


def test_next_click_picks_the_larger_error_and_labels_it():
    gt = np.zeros((30, 30), bool)
    gt[5:25, 5:25] = True
    pred = gt.copy()
    pred[5:25, 5:12] = False  # a 20x7 false negative strip
    pred[0:3, 0:30] = True  # a 3-high false positive strip
    y, x, label = next_click(pred, gt)
    fn = gt & ~pred
    assert label == 1 and fn[y, x] and _edt(fn)[y, x] == pytest.approx(_edt(fn).max())
    pred2 = gt.copy()
    pred2[10:12, 10:12] = False  # small FN
    pred2[26:30, 0:30] = True  # larger FP
    y, x, label = next_click(pred2, gt)
    assert label == 0 and (pred2 & ~gt)[y, x]
    assert next_click(gt, gt) == (0, 0, 0)  # RITM: an exact prediction still gets a negative click, at (0, 0)


class ScriptedSam(torch.nn.Module):
    """Answers every prompt with the low-res GT in token ``good`` and an empty mask elsewhere;
    predicted IoU favours token ``confident``."""

    def __init__(self, gt_low, good=2, confident=2):
        super().__init__()
        self.gt_low, self.good, self.confident = gt_low, good, confident
        self.image_encoder = lambda x: torch.zeros(x.shape[0], 8, 4, 4)
        self.prompt_encoder = self
        self.mask_decoder = self
        self.calls = []

    def get_dense_pe(self):
        return torch.zeros(1, 8, 4, 4)

    def forward(self, points, boxes, masks):
        self.calls.append((points[0].clone(), points[1].clone(), masks))
        return points[0], None

    def predict_masks(self, emb, pe, sparse, dense):
        R = self.gt_low.shape[0]
        low = torch.full((R, 4, *self.gt_low.shape[-2:]), -10.0)
        low[:, self.good] = torch.where(self.gt_low, 10.0, -10.0)
        low[:, 0] = torch.where(self.gt_low, 10.0, -10.0)
        iou = torch.zeros(R, 4)
        iou[:, self.confident] = 1.0
        return low, iou


def test_protocol_default_and_oracle():
    b = toy_batch(2, 3, 64, num_valid=2)
    B, N, S = 2, 3, 64
    gt_low = b["masks_lowres"].reshape(B * N, 16, 16)
    # lowres GT upsampled bilinearly vs the full-res GT: the best reachable IoU
    up = F.interpolate(torch.where(gt_low, 10.0, -10.0)[:, None], (S, S), mode="bilinear") > 0
    ref = (up[:, 0] & b["masks"].view(-1, S, S)).sum((1, 2)) / (up[:, 0] | b["masks"].view(-1, S, S)).sum((1, 2))
    ref = ref[b["valid"].view(-1)]

    good = interactive_eval(ScriptedSam(gt_low, good=2, confident=2), b, ClickProtocol(clicks=(1, 2)))
    assert good["count"] == 4
    assert np.allclose(good["iou"][1], ref.numpy(), atol=1e-6)
    assert np.allclose(good["iou_oracle"][1], ref.numpy(), atol=1e-6)
    assert np.allclose(good["iou"][2], ref.numpy(), atol=1e-6)  # click 2: token 0

    wrong = interactive_eval(ScriptedSam(gt_low, good=2, confident=3), b, ClickProtocol(clicks=(1,)))
    assert np.allclose(wrong["iou"][1], 0) and np.allclose(wrong["iou_oracle"][1], ref.numpy(), atol=1e-6)
    m = summarize({"iou": wrong["iou"], "iou_oracle": wrong["iou_oracle"]})
    assert m["miou@1"] == 0 and m["miou_oracle@1"] == pytest.approx(float(ref.mean()), abs=1e-6)
    assert m["num_masks"] == 4


def test_protocol_clicks_and_mask_prompts():
    b = toy_batch(1, 2, 64)
    model = ScriptedSam(torch.zeros(2, 16, 16, dtype=torch.bool), good=1, confident=1)  # always empty
    interactive_eval(model, b, ClickProtocol(clicks=(3,)))
    assert len(model.calls) == 3
    coords, labels, mask = model.calls[0]
    assert mask is None and (labels == 1).all()
    gt = b["masks"][0].numpy()
    for r in range(2):  # click 1 = the mask centre
        y, x = center_click(gt[r])
        assert coords[r, 0].tolist() == [x, y]
    coords, labels, mask = model.calls[2]
    assert coords.shape[1] == 3 and (labels == 1).all()  # empty prediction: all FN clicks
    assert mask is not None and mask.shape == (2, 1, 16, 16)
