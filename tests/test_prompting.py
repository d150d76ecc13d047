"""Prompt simulation: sampled points, labels, round schedule, box noise."""

import cv2
import numpy as np
import pytest
import torch

from segany.modeling.constants import BOX_BR, BOX_TL, NEG, PAD, POS
from segany.testing.toy import toy_batch
from segany.training.prompting import (
    MASK,
    POINT,
    PromptConfig,
    chessboard_distance,
    error_points,
    initial_prompts,
    noisy_boxes,
    pixel_to_input,
    round_schedule,
    sample_uniform,
)


def _at(region, coords_xy, res, img_size):
    """region value at the pixel a point (input frame) falls in, at resolution res."""
    s = img_size / res
    x = ((coords_xy[:, 0] + 0.5) / s - 0.5).round().long()
    y = ((coords_xy[:, 1] + 0.5) / s - 0.5).round().long()
    return region[torch.arange(len(x)), y, x]


def test_sample_uniform_is_uniform_and_inside():
    region = torch.zeros(4000, 8, 8, dtype=torch.bool)
    region[:, 2:4, 1:6] = True  # 10 pixels
    region[0] = False  # an empty row
    yx, found = sample_uniform(region)
    assert not found[0] and found[1:].all()
    assert region[torch.arange(1, 4000), yx[1:, 0], yx[1:, 1]].all()
    counts = torch.bincount(yx[1:, 0] * 8 + yx[1:, 1], minlength=64).float()
    inside = counts[region[1].flatten()]
    assert inside.sum() == 3999
    # each of the 10 pixels ~ 400 +- 3 sigma (sigma ~ 19)
    assert (inside - 399.9).abs().max() < 70


def test_pixel_to_input_is_identity_at_full_res_and_centres_at_low_res():
    yx = torch.tensor([[0, 0], [3, 7]])
    assert torch.equal(pixel_to_input(yx, 16, 16), torch.tensor([[0.0, 0.0], [7.0, 3.0]]))
    assert torch.allclose(pixel_to_input(yx, 4, 16), torch.tensor([[1.5, 1.5], [29.5, 13.5]]))


def _round0(masks, boxes, valid, cfg, g=None, size=None):
    R, S = masks.shape[0], masks.shape[-1]
    size = torch.tensor([[S, S]]).expand(R, 2) if size is None else size
    return initial_prompts(masks, boxes, valid, size, cfg, g)


def test_round0_points_lie_in_the_mask_and_boxes_are_labelled():
    b = toy_batch(4, 16, 64, num_valid=12, generator=torch.Generator().manual_seed(1))
    R = 64
    masks, boxes, valid = b["masks"].view(R, 64, 64), b["boxes"].view(R, 4), b["valid"].view(R)
    pr = _round0(masks, boxes, valid, PromptConfig(p_box=0.5))
    coords, labels = pr.tokens()
    assert coords.shape == (R, 2, 2) and labels.shape == (R, 2)
    pt, bx = valid & ~pr.is_box, valid & pr.is_box
    assert pt.any() and bx.any()
    assert (labels[pt] == torch.tensor([POS, PAD])).all()  # the release: one point + one pad
    assert (labels[bx] == torch.tensor([BOX_TL, BOX_BR])).all()  # the release: a box, no pad
    assert (labels[~valid] == PAD).all()
    assert _at(masks, coords[:, 0], 64, 64)[pt].all()
    assert (coords[pt, 0] == coords[pt, 0].round()).all()  # full-res pixel indices


def test_round0_box_probability():
    R = 4000
    masks = torch.ones(R, 8, 8, dtype=torch.bool)
    boxes = torch.tensor([[0.0, 0.0, 7.0, 7.0]]).expand(R, 4)
    pr = _round0(masks, boxes, torch.ones(R, dtype=torch.bool), PromptConfig(p_box=0.5))
    assert abs(pr.is_box.float().mean().item() - 0.5) < 0.04
    pr = _round0(masks, boxes, torch.ones(R, dtype=torch.bool), PromptConfig(p_box=0.0))
    assert not pr.is_box.any()


def test_box_noise_statistics():
    n = 20000
    frame = torch.tensor([[1024, 1024]]).expand(n, 2)
    # a small box (scale = 10% of the side: 4 px in x, 2 px in y) and a large one (capped at 20 px)
    small = torch.tensor([[400.0, 400.0, 440.0, 420.0]]).expand(n, 4)
    large = torch.tensor([[100.0, 100.0, 700.0, 900.0]]).expand(n, 4)
    d = noisy_boxes(small, 0.1, 20.0, frame) - small
    assert torch.allclose(d.mean(0), torch.zeros(4), atol=0.15)
    assert torch.allclose(d.std(0), torch.tensor([4.0, 2.0, 4.0, 2.0]), rtol=0.05)
    d = noisy_boxes(large, 0.1, 20.0, frame) - large
    assert torch.allclose(d.std(0), torch.full((4,), 20.0), rtol=0.05)
    # SAM 2's law: uniform in [-scale, scale] (std scale / sqrt(3)), never beyond it
    d = noisy_boxes(large, 0.1, 20.0, frame, "uniform") - large
    assert d.abs().max() <= 20.0 and d.abs().max() > 19.9
    assert torch.allclose(d.std(0), torch.full((4,), 20.0 / 3**0.5), rtol=0.05)
    # clamped to the image content (h=500, w=300 of a 1024 frame), not to the padded frame; ordered
    size = torch.tensor([[500, 300]]).expand(n, 2)
    edge = noisy_boxes(torch.tensor([[0.0, 0.0, 299.0, 499.0]]).expand(n, 4), 0.1, 20.0, size)
    assert edge.min() >= 0 and edge[:, 2].max() == 299 and edge[:, 3].max() == 499
    assert (edge[:, 2] >= edge[:, 0]).all() and (edge[:, 3] >= edge[:, 1]).all()


def test_error_points_lie_in_the_error_region_with_the_right_label():
    g = torch.Generator().manual_seed(0)
    R, H = 500, 32
    gt = torch.rand(R, H, H, generator=g) < 0.3
    pred = torch.rand(R, H, H, generator=g) < 0.3
    pred[0] = gt[0]  # no error: a negative click in the background (SAM 2), not a pad
    pred[2], gt[2] = True, True  # no error, no background: a positive click in the mask
    valid = torch.ones(R, dtype=torch.bool)
    valid[1] = False  # invalid: pad
    for img in (H, 4 * H):  # full-res and low-res loss grids
        coords, labels = error_points(pred, gt, valid, img, generator=g)
        assert coords.shape == (R, 1, 2) and labels.shape == (R, 1)
        labels = labels[:, 0]
        assert labels[1] == PAD and labels[0] == NEG and labels[2] == POS
        assert not _at(gt, coords[:, 0], H, img)[0]
        ok = labels != PAD
        assert ok.sum() == R - 1
        fn = _at(gt & ~pred, coords[:, 0], H, img)
        fp = _at(pred & ~gt, coords[:, 0], H, img)
        assert (fn | fp)[3:].all()
        assert (labels[ok & fn] == POS).all() and (labels[ok & fp] == NEG).all()
        # the label is the GT at the clicked pixel, for every row
        assert torch.equal(labels[ok] == POS, _at(gt, coords[:, 0], H, img)[ok])


def test_error_points_stay_inside_the_image_region():
    R, H = 300, 16
    gt = torch.zeros(R, H, H, dtype=torch.bool)
    gt[:, 2:6, 2:6] = True
    pred = torch.ones(R, H, H, dtype=torch.bool)  # FP everywhere, also in the padding
    region = torch.zeros(R, H, H, dtype=torch.bool)
    region[:, :10, :12] = True  # content 10 x 12, the rest is padding
    coords, labels = error_points(pred, gt, torch.ones(R, dtype=torch.bool), H, region)
    assert _at(region, coords[:, 0], H, H).all() and (labels == NEG).all()


def test_error_points_choose_fn_and_fp_in_proportion():
    R = 4000
    gt = torch.zeros(R, 8, 8, dtype=torch.bool)
    pred = torch.zeros(R, 8, 8, dtype=torch.bool)
    gt[:, :, :3] = True  # 24 FN pixels (columns 0-2)
    pred[:, :, 7] = True  # 8 FP pixels (column 7)
    _, labels = error_points(pred, gt, torch.ones(R, dtype=torch.bool), 8)
    assert abs((labels == POS).float().mean().item() - 0.75) < 0.03


def test_chessboard_distance_matches_opencv():
    """OpenCV's chessboard transform (DIST_C) of the region padded by one background pixel (the
    image border counts as outside, as in RITM's clicker), capped at max_dist."""
    g = torch.Generator().manual_seed(0)
    # blobs: thresholded smoothed noise, so that regions have interiors of several pixels
    noise = torch.nn.functional.avg_pool2d(torch.rand(6, 1, 40, 48, generator=g), 7, 1, 3)[:, 0]
    region = noise > noise.flatten(1).median(1).values[:, None, None]
    for cap in (3, 32):
        ours = chessboard_distance(region, cap)
        for r in range(len(region)):
            pad = np.pad(region[r].numpy().astype(np.uint8), 1)
            ref = cv2.distanceTransform(pad, cv2.DIST_C, 3)[1:-1, 1:-1]
            assert np.array_equal(ours[r].numpy(), np.minimum(ref, cap)), (r, cap)


def test_interior_clicks_avoid_boundary_slivers():
    """A 2 px false-negative sliver along the mask's edge and a 6 x 6 false-negative hole: the
    uniform rule clicks the sliver in proportion to its area, the interior rule (RITM's) only the
    hole's inner half (chessboard distance > 3 / 2: its 4 x 4 core)."""
    R, H = 2000, 24
    gt = torch.zeros(R, H, H, dtype=torch.bool)
    gt[:, 2:22, 2:22] = True
    pred = gt.clone()
    pred[:, 2:22, 2:4] = False  # sliver: 40 px
    pred[:, 10:16, 10:16] = False  # hole: 36 px
    valid = torch.ones(R, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    core = torch.zeros(H, H, dtype=torch.bool)
    core[11:15, 11:15] = True
    coords, labels = error_points(pred, gt, valid, H, generator=g, rule="interior")
    assert (labels == POS).all() and _at(core.expand(R, H, H), coords[:, 0], H, H).all()
    sliver = torch.zeros(H, H, dtype=torch.bool)
    sliver[2:22, 2:4] = True
    coords, _ = error_points(pred, gt, valid, H, generator=g, rule="uniform")
    share = _at(sliver.expand(R, H, H), coords[:, 0], H, H).float().mean().item()
    assert abs(share - 40 / 76) < 0.04


def test_interior_clicks_pick_the_deeper_error_kind():
    """RITM: positive iff the false negatives reach strictly deeper than the false positives."""
    R, H = 200, 20
    gt = torch.zeros(R, H, H, dtype=torch.bool)
    gt[:, 0:10, :] = True
    pred = torch.zeros(R, H, H, dtype=torch.bool)
    pred[:, 0:10, 0:3] = True  # FN: 10 x 17 (depth 5); FP: the band below
    pred[:, 11:20, :] = True  # FP: 9 x 20 (depth 5): a tie, so a negative click
    _, labels = error_points(pred, gt, torch.ones(R, dtype=torch.bool), H, rule="interior")
    assert (labels == NEG).all()
    pred[:, 11:20, :] = False
    pred[:, 11:13, :] = True  # FP: 2 px deep now, the FN wins
    _, labels = error_points(pred, gt, torch.ones(R, dtype=torch.bool), H, rule="interior")
    assert (labels == POS).all()
    with pytest.raises(ValueError, match="click_rule"):
        PromptConfig(click_rule="center")


def test_default_schedule_has_11_rounds_with_two_mask_rounds():
    cfg = PromptConfig()
    assert cfg.num_rounds == 11
    positions = set()
    for seed in range(200):
        s = round_schedule(cfg, torch.Generator().manual_seed(seed))
        assert len(s) == 11 and s[0] == "init"
        assert s.count(POINT) == 8 and s.count(MASK) == 2
        assert s[-1] == MASK
        positions.add(s.index(MASK))
    # the other mask round: before each of the 8 point rounds, i.e. rounds 1..8
    assert positions == set(range(1, 9))


def test_schedule_follows_the_config():
    s = round_schedule(PromptConfig(point_rounds=3, mask_rounds=1))
    assert s == ["init", POINT, POINT, POINT, MASK]
    s = round_schedule(PromptConfig(point_rounds=2, mask_rounds=0))
    assert s == ["init", POINT, POINT]
    s = round_schedule(PromptConfig(point_rounds=4, mask_rounds=3, mask_round_last=False))
    assert len(s) == 8 and s.count(MASK) == 3 and s[-1] == POINT


def test_bad_config_names_the_key():
    import pytest

    with pytest.raises(ValueError, match="prompting.p_box"):
        PromptConfig(p_box=1.5)
    with pytest.raises(ValueError, match="prompting.resolution"):
        PromptConfig(resolution="half")


def test_training_tokens_equal_the_release_predictors():
    """The sparse embeddings of a training round equal segment_anything's PromptEncoder given the
    same point / box / points the way SamPredictor passes them (points + a box, or points and
    its appended padding point)."""
    sa = pytest.importorskip("segment_anything")
    from segany.modeling.prompt_encoder import PromptEncoder

    torch.manual_seed(0)
    official = sa.modeling.PromptEncoder(
        embed_dim=32, image_embedding_size=(16, 16), input_image_size=(64, 64), mask_in_chans=16
    )
    ours = PromptEncoder(embed_dim=32, image_embedding_size=(16, 16), input_image_size=(64, 64), mask_in_chans=16)
    ours.load_state_dict(official.state_dict())
    g = torch.Generator().manual_seed(2)
    b = toy_batch(2, 6, 64, num_valid=6, generator=g)
    R = 12
    masks, boxes, valid = b["masks"].view(R, 64, 64), b["boxes"].view(R, 4), b["valid"].view(R)
    pr = _round0(masks, boxes, valid, PromptConfig(p_box=0.5), g)
    assert pr.is_box.any() and (~pr.is_box).any()
    for k in range(4):  # round 0, then 3 corrective clicks
        if k:
            pred = torch.rand(R, 64, 64, generator=g) < 0.5
            pr.add(*error_points(pred, masks, valid, 64, generator=g))
        sparse, _ = ours(None, None, None, tokens=pr.tokens())
        for r in range(R):
            pts = (pr.clicks[r : r + 1], pr.click_labels[r : r + 1])
            if pr.is_box[r]:  # SamPredictor.predict(point_coords=clicks or None, box=box)
                ref, _ = official(pts if k else None, pr.box[r : r + 1], None)
            else:  # SamPredictor.predict(point_coords=[first point, clicks...]) -> + a padding point
                first = (torch.cat((pr.point[r : r + 1], pts[0]), 1), torch.cat((pr.point_label[r : r + 1], pts[1]), 1))
                ref, _ = official(first, None, None)
            assert torch.allclose(sparse[r : r + 1], ref, atol=1e-6), (k, r)
