"""Prompt simulation: sampled points, labels, round schedule, box noise."""

import torch

from segany.testing.toy import toy_batch
from segany.training.prompting import (
    BOX_BR,
    BOX_TL,
    MASK,
    NEG,
    PAD,
    POINT,
    POS,
    PromptConfig,
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


def test_round0_points_lie_in_the_mask_and_boxes_are_labelled():
    b = toy_batch(4, 16, 64, num_valid=12, generator=torch.Generator().manual_seed(1))
    R = 64
    masks, boxes, valid = b["masks"].view(R, 64, 64), b["boxes"].view(R, 4), b["valid"].view(R)
    coords, labels, is_box = initial_prompts(masks, boxes, valid, PromptConfig(p_box=0.5))
    assert coords.shape == (R, 2, 2) and labels.shape == (R, 2)
    pt = valid & ~is_box
    assert pt.any() and (valid & is_box).any()
    assert (labels[pt] == torch.tensor([POS, PAD])).all()
    assert (labels[valid & is_box] == torch.tensor([BOX_TL, BOX_BR])).all()
    assert (labels[~valid] == PAD).all()
    assert _at(masks, coords[:, 0], 64, 64)[pt].all()
    assert (coords[pt, 0] == coords[pt, 0].round()).all()  # full-res pixel indices


def test_round0_box_probability():
    R = 4000
    masks = torch.ones(R, 8, 8, dtype=torch.bool)
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0]]).expand(R, 4)
    _, _, is_box = initial_prompts(masks, boxes, torch.ones(R, dtype=torch.bool), PromptConfig(p_box=0.5))
    assert abs(is_box.float().mean().item() - 0.5) < 0.04
    _, _, is_box = initial_prompts(masks, boxes, torch.ones(R, dtype=torch.bool), PromptConfig(p_box=0.0))
    assert not is_box.any()


def test_box_noise_statistics():
    n = 20000
    # a small box (std = 10% of the side: 4 px in x, 2 px in y) and a large one (capped at 20 px)
    small = torch.tensor([[400.0, 400.0, 440.0, 420.0]]).expand(n, 4)
    large = torch.tensor([[100.0, 100.0, 700.0, 900.0]]).expand(n, 4)
    d = noisy_boxes(small, 0.1, 20.0, 1024) - small
    assert torch.allclose(d.mean(0), torch.zeros(4), atol=0.15)
    assert torch.allclose(d.std(0), torch.tensor([4.0, 2.0, 4.0, 2.0]), rtol=0.05)
    d = noisy_boxes(large, 0.1, 20.0, 1024) - large
    assert torch.allclose(d.std(0), torch.full((4,), 20.0), rtol=0.05)
    # clamped to the frame and ordered
    edge = noisy_boxes(torch.tensor([[0.0, 0.0, 2.0, 1023.0]]).expand(n, 4), 0.1, 20.0, 1024)
    assert edge.min() >= 0 and edge.max() <= 1023
    assert (edge[:, 2] >= edge[:, 0]).all() and (edge[:, 3] >= edge[:, 1]).all()


def test_error_points_lie_in_the_error_region_with_the_right_label():
    g = torch.Generator().manual_seed(0)
    R, H = 500, 32
    gt = torch.rand(R, H, H, generator=g) < 0.3
    pred = torch.rand(R, H, H, generator=g) < 0.3
    pred[0] = gt[0]  # no error: pad
    valid = torch.ones(R, dtype=torch.bool)
    valid[1] = False  # invalid: pad
    for img in (H, 4 * H):  # full-res and low-res loss grids
        coords, labels = error_points(pred, gt, valid, img, g)
        assert coords.shape == (R, 1, 2) and labels.shape == (R, 1)
        labels = labels[:, 0]
        assert labels[0] == PAD and labels[1] == PAD
        ok = labels != PAD
        assert ok[2:].all()
        fn = _at(gt & ~pred, coords[:, 0], H, img)
        fp = _at(pred & ~gt, coords[:, 0], H, img)
        assert (fn | fp)[ok].all()
        assert (labels[ok & fn] == POS).all() and (labels[ok & fp] == NEG).all()
        assert (labels == POS).any() and (labels == NEG).any()


def test_error_points_choose_fn_and_fp_in_proportion():
    R = 4000
    gt = torch.zeros(R, 8, 8, dtype=torch.bool)
    pred = torch.zeros(R, 8, 8, dtype=torch.bool)
    gt[:, :, :3] = True  # 24 FN pixels (columns 0-2)
    pred[:, :, 7] = True  # 8 FP pixels (column 7)
    _, labels = error_points(pred, gt, torch.ones(R, dtype=torch.bool), 8)
    assert abs((labels == POS).float().mean().item() - 0.75) < 0.03


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
