"""Mask AR / AP through COCOeval on hand-made detections whose recall and precision are
known, and the proposals task against the official package with the same weights."""

import numpy as np
import pytest
import segment_anything as official
from pycocotools import mask as mask_utils

from segany.evaluation import coco_ground_truth, mask_ap, mask_ar, proposal_generator, rank_proposals
from segany.evaluation.proposals import proposals_merge, proposals_part
from segany.evaluation.sources import EvalImage

try:
    from _official import build_blob_sam, make_test_image, to_segany
except ImportError:  # tests/ imported as a package
    from tests._official import build_blob_sam, make_test_image, to_segany


def _rle(mask):
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    r["counts"] = r["counts"].decode()
    return r


def _box(h, w, y0, x0, hh, ww):
    m = np.zeros((h, w), bool)
    m[y0 : y0 + hh, x0 : x0 + ww] = True
    return m


def _gt(masks, image_id=1, cats=None):
    return [
        {
            "image_id": image_id,
            "segmentation": _rle(m),
            "area": float(m.sum()),
            "iscrowd": 0,
            "bbox": [float(v) for v in mask_utils.toBbox(_rle(m))],
            "category_id": 1 if cats is None else cats[i],
        }
        for i, m in enumerate(masks)
    ]


def _det(mask, score, image_id=1, cat=1):
    return {"image_id": image_id, "segmentation": _rle(mask), "score": score, "category_id": cat}


def test_mask_ar_hand_made():
    H = W = 300
    A = _box(H, W, 10, 10, 40, 40)  # medium (1600 px)
    B = _box(H, W, 100, 10, 50, 40)  # medium (2000 px)
    C = _box(H, W, 10, 200, 5, 5)  # small (25 px)
    D = _box(H, W, 150, 150, 100, 100)  # large (10000 px)
    gt = coco_ground_truth([{"id": 1, "height": H, "width": W}], _gt([A, B, C, D]))
    B_part = _box(H, W, 100, 10, 36, 40)  # IoU 36/50 = 0.72: a match at IoU .50 .. .70, 5 of 10 thresholds
    junk = [_det(_box(H, W, 60 + 3 * i, 240, 20, 20), 0.7 - 0.01 * i) for i in range(9)]  # nowhere near a GT
    dets = [_det(A, 0.9), _det(D, 0.85), _det(B_part, 0.8), *junk, _det(C, 0.5)]  # C ranks 13th
    ar = mask_ar(gt, dets, (10, 100, 1000))
    assert ar["AR@10"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert ar["AR@100"] == pytest.approx((1 + 0.5 + 1 + 1) / 4)
    assert ar["AR@1000"] == pytest.approx(0.875)
    assert ar["AR_s@10"] == 0 and ar["AR_s@100"] == pytest.approx(1.0)
    assert ar["AR_m@100"] == pytest.approx(0.75) and ar["AR_l@100"] == pytest.approx(1.0)
    assert mask_ar(gt, [], (10,))["AR@10"] == 0.0
    with pytest.raises(ValueError, match="image ids"):
        mask_ar(gt, [_det(A, 0.9, image_id=7)])


def test_mask_ap_hand_made():
    H = W = 100
    A = _box(H, W, 10, 10, 30, 30)
    B = _box(H, W, 50, 50, 30, 30)
    gt = coco_ground_truth([{"id": 3, "height": H, "width": W}], _gt([A, B], 3, cats=[1, 2]))
    # category 1: a false positive ranked above the exact mask -> precision 1/2 at recall 1 -> AP .5
    # category 2: one exact mask -> AP 1. COCO averages categories: .75 at every IoU threshold
    fp = _box(H, W, 85, 0, 10, 10)
    dets = [_det(fp, 0.9, 3, 1), _det(A, 0.8, 3, 1), _det(B, 0.7, 3, 2)]
    ap = mask_ap(gt, dets)
    assert ap["AP"] == pytest.approx(0.75) and ap["AP50"] == pytest.approx(0.75) and ap["AP75"] == pytest.approx(0.75)
    assert mask_ap(gt, [_det(A, 0.8, 3, 1), _det(B, 0.7, 3, 2)])["AP"] == pytest.approx(1.0)


def test_rank_proposals_by_mean_of_iou_and_stability():
    recs = [
        {"predicted_iou": 0.9, "stability_score": 0.5},
        {"predicted_iou": 0.6, "stability_score": 0.95},
        {"predicted_iou": 0.99, "stability_score": 0.99},
    ]
    top = rank_proposals(recs, top_k=2)
    assert [r["score"] for r in top] == pytest.approx([0.99, 0.775])


def _scene_gt(image_shape):
    """The filled shapes drawn by make_test_image, as instance masks (later shapes occlude)."""
    import cv2

    h, w = image_shape[:2]
    layers = []
    for draw in (
        lambda c: cv2.rectangle(c, (20, 30), (110, 120), 1, -1),
        lambda c: cv2.circle(c, (200, 70), 45, 1, -1),
        lambda c: cv2.fillPoly(c, [np.array([[150, 190], [290, 190], [230, 110]], np.int32)], 1),
        lambda c: cv2.ellipse(c, (60, 165), (45, 20), 15, 0, 360, 1, -1),
        lambda c: cv2.rectangle(c, (130, 20), (150, 180), 1, -1),
    ):
        c = np.zeros((h, w), np.uint8)
        draw(c)
        layers.append(c.astype(bool))
    visible = [m & ~np.any(layers[i + 1 :], axis=0) if i + 1 < len(layers) else m for i, m in enumerate(layers)]
    return [
        {
            "id": i + 1,
            "segmentation": _rle(m),
            "area": float(m.sum()),
            "iscrowd": 0,
            "bbox": [float(v) for v in mask_utils.toBbox(_rle(m))],
            "category_id": 1,
        }
        for i, m in enumerate(visible)
    ]


def test_proposals_official_and_segany_give_the_same_ar(tmp_path):
    ref = build_blob_sam(seed=0)
    ours = to_segany(ref, tmp_path / "blob.pth")
    image = make_test_image(200, 300)
    ev = EvalImage("img", 1, image, _scene_gt(image.shape))
    settings = dict(
        points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=0.9, output_mode="coco_rle"
    )
    ref_gen = official.SamAutomaticMaskGenerator(ref, **settings)
    ours_gen = proposal_generator(ours, points_per_side=8, nms_thresh=0.9)
    ref_part = proposals_part(ref_gen, [ev], top_k=1000)
    our_part = proposals_part(ours_gen, [ev], top_k=1000)
    assert len(our_part["dets"]) == len(ref_part["dets"]) > 20
    ref_ar = proposals_merge([ref_part], (10, 100, 1000))
    our_ar = proposals_merge([our_part], (10, 100, 1000))
    assert our_ar["AR@1000"] > 0.05  # the blob model does find parts of the shapes
    assert set(our_ar) == set(ref_ar)
    for k in our_ar:  # AR_s / AR_l are NaN for both: the scene has only medium objects
        assert our_ar[k] == pytest.approx(ref_ar[k], abs=1e-3, nan_ok=True), k
