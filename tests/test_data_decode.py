"""segany.data.decode: the one image decoder (against Pillow) and its one error rule."""

import io

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from segany.data.decode import decode_image, decode_mask
from segany.data.faults import SampleFault


def encoded(img: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def picture():
    rng = np.random.default_rng(0)
    img = np.zeros((64, 96, 3), np.uint8)
    img[..., 0] = np.linspace(0, 255, 96)[None]  # red ramp left to right, blue top to bottom
    img[..., 2] = np.linspace(0, 255, 64)[:, None]
    img[20:40, 30:60, 1] = 200
    return np.minimum(img.astype(int) + rng.integers(0, 8, img.shape), 255).astype(np.uint8)


def test_rgb_and_bgr_are_the_stored_pixels(picture):
    data = encoded(picture, "PNG")
    rgb = decode_image(data, "a.png")
    np.testing.assert_array_equal(rgb, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    np.testing.assert_array_equal(rgb, picture)
    bgr = decode_image(data, "a.png", bgr=True, size=(64, 96))
    np.testing.assert_array_equal(bgr, picture[..., ::-1])
    assert rgb.flags.c_contiguous


def test_jpeg_decoded_at_the_smallest_scale_that_is_large_enough(picture):
    data = encoded(picture, "JPEG", quality=95)
    full = decode_image(data, size=(64, 96)).astype(int)
    assert full.shape == (64, 96, 3) and np.abs(full - np.asarray(Image.open(io.BytesIO(data)))).mean() < 2
    assert decode_image(data, size=(64, 96), need=(16, 24)).shape == (16, 24, 3)  # 1/4
    assert decode_image(data, size=(64, 96), need=(17, 24)).shape == (32, 48, 3)  # 1/4 too small: 1/2
    assert decode_image(encoded(picture, "PNG"), size=(64, 96), need=(8, 8)).shape == (64, 96, 3)  # PNG: full
    quarter = Image.open(io.BytesIO(data))
    quarter.draft("RGB", (24, 16))  # libjpeg's DCT scaling, as Pillow drives it
    assert quarter.size == (24, 16)
    reduced = decode_image(data, size=(64, 96), need=(16, 24)).astype(int)
    assert np.abs(reduced - np.asarray(quarter.convert("RGB"))).mean() < 3


@pytest.mark.parametrize(
    "data,size,why",
    [
        (b"", None, "empty image file"),
        (b"not an image at all", None, "image does not decode"),
        ("truncated", None, "truncated JPEG"),
        ("png", (64, 95), "image is 64x96, annotations say 64x95"),
        ("jpeg_reduced", (60, 96), r"image is 64x96 \(scale 1/2\), annotations say 60x96"),
    ],
)
def test_every_failure_is_a_bad_image_fault_naming_the_file(picture, data, size, why):
    need = None
    if data == "truncated":
        data = encoded(picture, "JPEG")[:300]
    elif data == "png":
        data = encoded(picture, "PNG")
    elif data == "jpeg_reduced":
        data, need = encoded(picture, "JPEG"), (30, 40)
    with pytest.raises(SampleFault, match=f"bad_image: shard_3.tar:sa_7: {why}") as e:
        decode_image(data, "shard_3.tar:sa_7", size=size, need=need)
    assert e.value.kind == "bad_image"
    with pytest.raises(SampleFault, match=f"^bad_image: {why}"):  # no place given: the reason alone
        decode_image(data, size=size, need=need)


# ------------------------------------------------------------------ masks


def masks_to_check():
    rng = np.random.default_rng(1)
    masks = rng.random((5, 23, 31)) < rng.random((5, 1, 1))
    masks[0], masks[1] = False, True  # empty, full
    return masks


def test_compressed_and_uncompressed_rle_decode_to_the_mask():
    for m in masks_to_check():
        enc = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))  # counts: bytes
        flat = m.T.reshape(-1)  # column-major, as COCO
        edges = np.flatnonzero(np.r_[True, flat[1:] != flat[:-1], True])
        runs = np.diff(edges).tolist()
        runs = [0] + runs if flat[0] else runs  # runs start with the background
        for seg in (enc, {"size": enc["size"], "counts": enc["counts"].decode()}, {"size": [23, 31], "counts": runs}):
            got = decode_mask(seg)
            assert got.dtype == bool and got.flags.c_contiguous
            np.testing.assert_array_equal(got, m)


@pytest.mark.parametrize(
    "counts",
    [[10, 5], [700, 5, 9], [-3, 716], "", "0`0", b"\x7f\x7f"],
    ids=["short", "long", "negative", "empty", "ends-inside-a-value", "not-rle-characters"],
)
def test_an_invalid_rle_is_a_bad_json_fault_naming_the_annotation(counts):
    with pytest.raises(SampleFault, match=r"bad_json: val.json:ann 4: invalid RLE \(counts do not decode to 23x31"):
        decode_mask({"size": [23, 31], "counts": counts}, "val.json:ann 4")
