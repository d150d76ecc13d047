"""Parity of segany.inference (SamPredictor, SamAutomaticMaskGenerator) with the
official segment_anything package: the official model with fixed random weights,
its state_dict loaded into segany's vit_tiny, both pipelines compared (fp32, 1e-4)."""

import inspect
from pathlib import Path

import numpy as np
import pytest
import segment_anything as official
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from segany.inference import SamAutomaticMaskGenerator, SamPredictor

try:
    from _official import build_blob_sam, build_official_tiny_sam, make_test_image, to_segany
except ImportError:  # tests/ imported as a package
    from tests._official import build_blob_sam, build_official_tiny_sam, make_test_image, to_segany

ATOL = 1e-4


@pytest.fixture(scope="module")
def image():
    return make_test_image(200, 300)


@pytest.fixture(scope="module")
def random_models(tmp_path_factory):
    ref = build_official_tiny_sam(seed=0)
    ours = to_segany(ref, tmp_path_factory.mktemp("ckpt") / "tiny_random.pth")
    return ref, ours


@pytest.fixture(scope="module")
def blob_models(tmp_path_factory):
    ref = build_blob_sam(seed=0)
    ours = to_segany(ref, tmp_path_factory.mktemp("ckpt") / "tiny_blob.pth")
    return ref, ours


@pytest.fixture(scope="module")
def predictors(random_models, image):
    ref_model, our_model = random_models
    ref, ours = official.SamPredictor(ref_model), SamPredictor(our_model)
    ref.set_image(image)
    ours.set_image(image)
    return ref, ours


def _close(a, b, atol=ATOL):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=0, atol=atol)


def _check_outputs(ref_out, our_out, ref_logits):
    """masks, iou, low-res of ``predict``; bool masks may differ only where the
    reference logit is within 1e-3 of the threshold."""
    (rm, ri, rl), (om, oi, ol) = ref_out, our_out
    assert om.shape == rm.shape and oi.shape == ri.shape and ol.shape == rl.shape
    assert om.dtype == rm.dtype and oi.dtype == ri.dtype and ol.dtype == rl.dtype
    _close(oi, ri)
    _close(ol, rl)
    if rm.dtype == bool:
        assert ((om != rm) & (np.abs(ref_logits) > 1e-3)).sum() == 0
    else:
        _close(om, rm)


# --------------------------------------------------------------------------- predictor


def test_image_embedding(predictors):
    ref, ours = predictors
    e_ref, e_ours = ref.get_image_embedding(), ours.get_image_embedding()
    assert e_ours.shape == e_ref.shape == (1, 256, 16, 16)
    _close(e_ours, e_ref)
    assert ours.original_size == ref.original_size == (200, 300)
    assert ours.input_size == ref.input_size == (171, 256)
    assert ours.is_image_set and ours.device == ref.device


PROMPTS = {
    "one_point": dict(point_coords=np.array([[60.0, 70.0]]), point_labels=np.array([1])),
    "points": dict(
        point_coords=np.array([[200.0, 70.0], [230.0, 170.0], [20.0, 180.0]]), point_labels=np.array([1, 1, 0])
    ),
    "box": dict(box=np.array([15.0, 25.0, 115.0, 125.0])),
    "box_points": dict(
        point_coords=np.array([[60.0, 70.0], [140.0, 100.0]]),
        point_labels=np.array([1, 0]),
        box=np.array([15, 25, 150, 125]),
    ),
}


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_predict_parity(predictors, prompt, multimask):
    ref, ours = predictors
    kw = dict(PROMPTS[prompt], multimask_output=multimask)
    ref_logits = ref.predict(**kw, return_logits=True)
    our_logits = ours.predict(**kw, return_logits=True)
    _check_outputs(ref_logits, our_logits, ref_logits[0])
    assert ref_logits[0].shape[0] == (3 if multimask else 1)
    _check_outputs(ref.predict(**kw), ours.predict(**kw), ref_logits[0])


@pytest.mark.parametrize("with_point", [False, True])
def test_predict_mask_input(predictors, with_point):
    ref, ours = predictors
    _, iou, low_res = ref.predict(**PROMPTS["one_point"])
    mask_input = low_res[np.argmax(iou)][None]  # (1, 64, 64) logits
    kw = dict(mask_input=mask_input, multimask_output=False)
    if with_point:
        kw.update(PROMPTS["box_points"])
    ref_out = ref.predict(**kw, return_logits=True)
    _check_outputs(ref_out, ours.predict(**kw, return_logits=True), ref_out[0])
    _check_outputs(ref.predict(**kw), ours.predict(**kw), ref_out[0])


def test_predict_torch_batch(predictors):
    ref, ours = predictors
    g = torch.Generator().manual_seed(1)
    coords = torch.rand(5, 2, 2, generator=g) * torch.tensor([256.0, 171.0])  # (N, P, 2) input frame
    labels = torch.tensor([[1, 0], [1, 1], [0, 1], [1, -1], [1, 1]])
    boxes = torch.tensor([[10.0, 10.0, 100.0, 90.0]]).repeat(5, 1) + torch.arange(5.0)[:, None] * 20
    for kw in (dict(), dict(boxes=boxes)):
        for multimask in (True, False):
            r = ref.predict_torch(coords, labels, multimask_output=multimask, return_logits=True, **kw)
            o = ours.predict_torch(coords, labels, multimask_output=multimask, return_logits=True, **kw)
            for a, b in zip(o, r):
                assert a.shape == b.shape and a.dtype == b.dtype
                _close(a, b)
    # float64 coordinates are accepted, as by the release
    _close(
        ours.predict_torch(coords.double(), labels, return_logits=True)[0],
        ref.predict_torch(coords.double(), labels, return_logits=True)[0],
    )
    masks, iou, low = ours.predict_torch(coords, labels)
    assert masks.dtype == torch.bool and masks.shape == (5, 3, 200, 300) and low.shape == (5, 3, 64, 64)
    # boxes only
    r = ref.predict_torch(None, None, boxes=boxes, return_logits=True)
    o = ours.predict_torch(None, None, boxes=boxes, return_logits=True)
    for a, b in zip(o, r):
        _close(a, b)


def test_set_torch_image_and_bgr(random_models, image):
    ref_model, our_model = random_models
    ref, ours = official.SamPredictor(ref_model), SamPredictor(our_model)
    x = torch.as_tensor(image).permute(2, 0, 1)[None].float()
    x = ours.transform.apply_image_torch(x)  # (1, 3, 171, 256)
    ref.set_torch_image(x, image.shape[:2])
    ours.set_torch_image(x, image.shape[:2])
    _close(ours.get_image_embedding(), ref.get_image_embedding())
    kw = PROMPTS["points"]
    _close(ours.predict(**kw, return_logits=True)[0], ref.predict(**kw, return_logits=True)[0])

    ref.set_image(image)
    ours.set_image(np.ascontiguousarray(image[..., ::-1]), image_format="BGR")
    _close(ours.get_image_embedding(), ref.get_image_embedding())


def test_multi_image_batch(random_models, image):
    """Extension: B same-size images, prompts grouped per image."""
    _, model = random_models
    ours = SamPredictor(model)
    images = [image, np.ascontiguousarray(image[::-1, ::-1])]
    xs = torch.cat([torch.as_tensor(np.array(ours.transform.apply_image(im))).permute(2, 0, 1)[None] for im in images])
    ours.set_torch_image(xs, image.shape[:2])
    assert ours.get_image_embedding().shape == (2, 256, 16, 16)
    coords = torch.tensor([[[50.0, 60.0]], [[120.0, 80.0]], [[200.0, 30.0]], [[10.0, 150.0]]])  # (4, 1, 2)
    labels = torch.ones(4, 1, dtype=torch.int)
    batched = ours.predict_torch(coords, labels, return_logits=True)
    for b, im in enumerate(images):
        single = SamPredictor(model)
        single.set_image(im)
        out = single.predict_torch(coords[2 * b : 2 * b + 2], labels[2 * b : 2 * b + 2], return_logits=True)
        for a, s in zip(batched, out):
            _close(a[2 * b : 2 * b + 2], s)
    with pytest.raises(ValueError):
        ours.predict_torch(coords[:3], labels[:3])


def test_predictor_state_errors(random_models, image):
    ours = SamPredictor(random_models[1])
    with pytest.raises(RuntimeError):
        ours.predict(**PROMPTS["one_point"])
    with pytest.raises(RuntimeError):
        ours.get_image_embedding()
    ours.set_image(image)
    assert ours.is_image_set
    ours.reset_image()
    assert not ours.is_image_set and ours.features is None
    with pytest.raises(ValueError):
        ours.set_image(image, image_format="HSV")
    with pytest.raises(ValueError):
        ours.set_torch_image(torch.zeros(1, 3, 100, 100), (100, 100))


# --------------------------------------------------------------------------- automatic mask generator


def test_generator_signature_matches_official():
    ours = inspect.signature(SamAutomaticMaskGenerator.__init__).parameters
    ref = inspect.signature(official.SamAutomaticMaskGenerator.__init__).parameters
    # the release's parameters, in its order; segany's extras only after them, keyword-only
    assert list(ours)[: len(ref)] == list(ref)
    assert list(ours)[len(ref) :] == ["precision"] and ours["precision"].kind is inspect.Parameter.KEYWORD_ONLY
    assert ours["precision"].default == "fp32"
    for name in ref:
        if name not in ("self", "model"):
            assert ours[name].default == ref[name].default, name


def _seg_to_mask(seg, output_mode):
    if output_mode == "binary_mask":
        return seg
    if output_mode == "coco_rle":
        return mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)
    return mask_utils.decode(mask_utils.frPyObjects(seg, *seg["size"])).astype(bool)


def _compare_records(ref_recs, our_recs, output_mode):
    """Same masks, in the same order. The two models agree to ~1e-6 relative in fp32,
    so a pixel whose logit lies within ~1e-4 of a threshold (0, +-offset) may flip: at
    least 90% of the records must be identical (segmentation, area, bbox, stability to
    1e-4) and the others may differ by a few boundary pixels."""
    assert len(our_recs) == len(ref_recs)
    n_exact = 0
    for r, o in zip(ref_recs, our_recs):
        assert set(o) == set(r)
        assert type(o["area"]) is int and [type(v) for v in o["bbox"]] == [int] * 4
        assert isinstance(o["predicted_iou"], float) and isinstance(o["stability_score"], float)
        assert o["crop_box"] == r["crop_box"]
        _close(o["point_coords"], r["point_coords"], atol=1e-9)
        _close(o["predicted_iou"], r["predicted_iou"])
        if output_mode == "binary_mask":
            assert o["segmentation"].dtype == r["segmentation"].dtype == bool
        else:
            assert type(o["segmentation"]["counts"]) is type(r["segmentation"]["counts"])
            assert list(o["segmentation"]["size"]) == list(r["segmentation"]["size"])
        om, rm = _seg_to_mask(o["segmentation"], output_mode), _seg_to_mask(r["segmentation"], output_mode)
        assert om.shape == rm.shape
        assert o["area"] == int(om.sum()) and r["area"] == int(rm.sum())
        n_diff = int((om != rm).sum())
        exact = (
            n_diff == 0
            and o["bbox"] == r["bbox"]
            and abs(o["stability_score"] - r["stability_score"]) <= ATOL
            and (output_mode == "binary_mask" or o["segmentation"] == r["segmentation"])
        )
        n_exact += exact
        if not exact:  # boundary flips only
            assert n_diff <= max(3, 0.003 * r["area"]), n_diff
            _close(o["bbox"], r["bbox"], atol=1)
            _close(o["stability_score"], r["stability_score"], atol=5e-3)
    assert n_exact >= 0.9 * len(ref_recs), (n_exact, len(ref_recs))


AMG_CASES = {
    "binary_mask": dict(points_per_side=10, pred_iou_thresh=0.8, stability_score_thresh=0.7),
    "coco_rle_crops_small_regions": dict(
        points_per_side=8,
        crop_n_points_downscale_factor=2,
        pred_iou_thresh=0.8,
        stability_score_thresh=0.6,
        crop_n_layers=1,
        min_mask_region_area=30,
        output_mode="coco_rle",
    ),
    "uncompressed_rle_grids": dict(
        points_per_side=None,
        point_grids=[np.random.default_rng(0).random((40, 2)), np.random.default_rng(1).random((12, 2))],
        points_per_batch=7,
        stability_score_thresh=0.5,
        stability_score_offset=2.0,
        box_nms_thresh=0.5,
        crop_n_layers=1,
        crop_nms_thresh=0.6,
        crop_overlap_ratio=0.25,
        output_mode="uncompressed_rle",
    ),
    "defaults": dict(points_per_side=8),
}


@pytest.mark.parametrize("case", list(AMG_CASES))
def test_generate_parity(blob_models, image, case):
    ref_model, our_model = blob_models
    kw = AMG_CASES[case]
    ref_recs = official.SamAutomaticMaskGenerator(ref_model, **kw).generate(image)
    our_recs = SamAutomaticMaskGenerator(our_model, **kw).generate(image)
    assert len(ref_recs) >= 10  # the test model must give a meaningful number of masks
    _compare_records(ref_recs, our_recs, kw.get("output_mode", "binary_mask"))


def test_generate_empty(random_models, image):
    """Random weights: nothing passes the default filters -> empty list, like the release."""
    ref_model, our_model = random_models
    assert official.SamAutomaticMaskGenerator(ref_model, points_per_side=4).generate(image) == []
    assert SamAutomaticMaskGenerator(our_model, points_per_side=4, crop_n_layers=1).generate(image) == []


def test_generator_argument_errors(blob_models):
    model = blob_models[1]
    with pytest.raises(ValueError):
        SamAutomaticMaskGenerator(model, points_per_side=None)
    with pytest.raises(ValueError):
        SamAutomaticMaskGenerator(model, points_per_side=8, point_grids=[np.zeros((1, 2))])
    with pytest.raises(ValueError):
        SamAutomaticMaskGenerator(model, output_mode="polygon")


PHOTO = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos" / "dog.jpg"


@pytest.mark.skipif(not PHOTO.is_file(), reason="needs ../shared/data/photos")
def test_generate_parity_on_a_real_photo(blob_models):
    """A real photo (crops, small-region cleanup, COCO RLE): the low-res-until-NMS pipeline
    keeps the release's masks, bit for bit."""
    ref_model, our_model = blob_models
    photo = np.asarray(Image.open(PHOTO).convert("RGB").resize((300, 200), Image.BILINEAR))
    kw = AMG_CASES["coco_rle_crops_small_regions"]
    ref_recs = official.SamAutomaticMaskGenerator(ref_model, **kw).generate(photo)
    our_recs = SamAutomaticMaskGenerator(our_model, **kw).generate(photo)
    assert len(ref_recs) >= 50
    _compare_records(ref_recs, our_recs, "coco_rle")
    identical = sum(o["segmentation"] == r["segmentation"] for o, r in zip(our_recs, ref_recs))
    assert identical >= 0.98 * len(ref_recs), (identical, len(ref_recs))


def test_bf16_predictor_agrees_with_fp32(blob_models, image):
    """precision="bf16": autocast on the model's device type; outputs stay float32, masks agree."""
    model = blob_models[1]
    outs = {}
    for precision in ("fp32", "bf16"):
        pred = SamPredictor(model, precision=precision)
        pred.set_image(image)
        assert pred.get_image_embedding().dtype == torch.float32
        outs[precision] = pred.predict(point_coords=np.array([[60.0, 70.0]]), point_labels=np.array([1]))
    (m32, i32, _), (m16, i16, l16) = outs["fp32"], outs["bf16"]
    assert i16.dtype == l16.dtype == np.float32 and m16.dtype == bool
    iou = (m16 & m32).sum((1, 2)) / (m16 | m32).sum((1, 2))
    assert iou.min() > 0.97, iou
    _close(i16, i32, atol=0.02)
    with pytest.raises(ValueError, match="precision"):
        SamPredictor(model, precision="fp16")
