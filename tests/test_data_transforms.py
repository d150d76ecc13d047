"""Large-scale jitter and flip keep image, masks and boxes aligned, checked pixel-wise."""

import numpy as np
import pytest
import torch

from segany.data import PIXEL_MEAN, PIXEL_STD, Record, SampleConfig, make_sample
from segany.data.scenes import make_scene
from segany.testing.data import jpeg, rle_string


def scene_record(seed, h=90, w=120, n=6):
    img, masks = make_scene(np.random.default_rng(seed), h, w, n, textures=("flat",))
    rec = Record(f"sa_{seed}", "test", jpeg(img, 98), h, w, [rle_string(m) for m in masks], np.arange(len(masks)))
    # the colour of each object, from the original image well inside its mask
    colours = [np.median(img[m], axis=0) for m in masks]
    return rec, masks, colours


def rgb(sample):
    return sample["image"].numpy().transpose(1, 2, 0) * PIXEL_STD + PIXEL_MEAN


def erode(m):
    out = m.copy()
    out[1:] &= m[:-1]
    out[:-1] &= m[1:]
    out[:, 1:] &= m[:, :-1]
    out[:, :-1] &= m[:, 1:]
    return out


@pytest.mark.parametrize("seed", range(6))
def test_jitter_and_flip_keep_everything_aligned(seed):
    rec, masks, colours = scene_record(seed)
    cfg = SampleConfig(img_size=128, jitter=(0.3, 2.0), flip=0.5)
    for draw in range(4):
        s = make_sample(rec, cfg, np.random.default_rng([seed, draw]))
        image = rgb(s)
        ch, cw = s["input_size"].tolist()
        assert (s["image"][:, ch:] == 0).all() and (s["image"][:, :, cw:] == 0).all()  # zero padding
        assert not s["masks"][:, ch:].any() and not s["masks"][:, :, cw:].any()
        for row, mid in enumerate(s["mask_ids"].tolist()):
            m = s["masks"][row].numpy()
            ys, xs = np.nonzero(m)
            assert s["boxes"][row].tolist() == [xs.min(), ys.min(), xs.max(), ys.max()]  # boxes = mask extent
            inner = erode(erode(m))
            if inner.sum() < 20:
                continue
            # pixels inside the transformed mask have the object's colour
            close = np.abs(image[inner] - colours[mid]).max(1) < 30
            assert close.mean() > 0.9, (seed, draw, mid, close.mean())


def test_flip_mirrors_image_masks_and_boxes_exactly():
    rec, masks, _ = scene_record(11)
    plain = make_sample(rec, SampleConfig(img_size=128), np.random.default_rng(0))
    flipped = make_sample(rec, SampleConfig(img_size=128, flip=1.0), np.random.default_rng(0))
    ch, cw = plain["input_size"].tolist()
    assert flipped["input_size"].tolist() == [ch, cw]
    torch.testing.assert_close(flipped["image"][:, :ch, :cw], plain["image"][:, :ch, :cw].flip(-1))
    assert torch.equal(flipped["masks"][:, :ch, :cw], plain["masks"][:, :ch, :cw].flip(-1))
    b = plain["boxes"]
    expect = torch.stack([cw - 1 - b[:, 2], b[:, 1], cw - 1 - b[:, 0], b[:, 3]], 1)
    assert torch.equal(flipped["boxes"], expect)


def test_jitter_scale_range_and_crop():
    rec, masks, _ = scene_record(5, h=100, w=160)
    sizes = []
    for draw in range(30):
        s = make_sample(rec, SampleConfig(img_size=64, jitter=(0.1, 2.0)), np.random.default_rng(draw))
        sizes.append(s["input_size"].tolist())
    longs = [max(hw) for hw in sizes]
    assert min(longs) <= 20 and max(longs) == 64  # scales < 1 pad, scales > 1 crop to S
    assert all(h <= 64 and w <= 64 for h, w in sizes)


def test_lowres_is_block_average():
    rec, masks, _ = scene_record(3, h=70, w=100)
    s = make_sample(rec, SampleConfig(img_size=64, lowres_targets=True), np.random.default_rng(0))
    m = s["masks"].numpy().astype(np.float64)
    expect = m.reshape(len(m), 16, 4, 16, 4).mean((2, 4)) > 0.5
    np.testing.assert_array_equal(s["masks_lowres"].numpy(), expect)


def test_constants_match_model_package():
    # the data's normalisation equals the release's Sam defaults
    import inspect

    from segment_anything.modeling import Sam as OfficialSam

    defaults = inspect.signature(OfficialSam.__init__).parameters
    assert list(PIXEL_MEAN) == defaults["pixel_mean"].default
    assert list(PIXEL_STD) == defaults["pixel_std"].default
