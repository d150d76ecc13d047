"""The instances task: box prompt + one refinement pass, checked against the official
predictor driven by hand with the same weights; the detections file's errors."""

import json

import numpy as np
import pytest
import segment_anything as official

from segany.evaluation import load_detections, segment_boxes
from segany.inference import SamPredictor

try:
    from _official import build_official_tiny_sam, make_test_image, to_segany
except ImportError:  # tests/ imported as a package
    from tests._official import build_official_tiny_sam, make_test_image, to_segany


@pytest.mark.parametrize("multimask_first", [False, True])
def test_box_then_refinement_matches_the_official_predictor(tmp_path, multimask_first):
    ref_model = build_official_tiny_sam(seed=0)
    ours = SamPredictor(to_segany(ref_model, tmp_path / "tiny.pth"))
    ref = official.SamPredictor(ref_model)
    image = make_test_image(120, 180)
    ours.set_image(image)
    ref.set_image(image)
    boxes = np.array([[10, 15, 70, 80], [100, 20, 170, 110], [5, 5, 175, 115]], np.float64)
    got = segment_boxes(ours, boxes, refine=True, multimask_first=multimask_first)
    for i, box in enumerate(boxes):
        _, iou, low = ref.predict(box=box, multimask_output=multimask_first)
        best = int(np.argmax(iou))
        logits, _, _ = ref.predict(box=box, mask_input=low[best : best + 1], multimask_output=False, return_logits=True)
        want = logits[0] > 0
        differ = got[i] != want
        assert (differ & (np.abs(logits[0]) > 1e-3)).sum() == 0  # only pixels at the threshold may flip
    one_pass = segment_boxes(ours, boxes, refine=False)
    assert one_pass.shape == got.shape and (one_pass != got).any()  # the refinement pass changes the masks


def test_detections_file_errors_name_the_file_and_entry(tmp_path):
    good = tmp_path / "dets.json"
    good.write_text(
        json.dumps(
            [
                {"image_id": 1, "bbox": [0, 0, 5, 5], "score": 0.9, "category_id": 3},
                {"image_id": 1, "bbox": [1, 1, 5, 5], "score": 0.1, "category_id": 3},
            ]
        )
    )
    d = load_detections(str(good), min_score=0.5)
    assert list(d) == [1] and d[1] == [{"bbox": [0.0, 0.0, 5.0, 5.0], "score": 0.9, "category_id": 3}]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_id": 1, "bbox": [0, 0, 5, 5], "score": 0.9}, {"image_id": 2, "score": 1}]))
    with pytest.raises(ValueError, match=r"bad.json: entry 1 has no 'bbox'"):
        load_detections(str(bad))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_detections(str(tmp_path / "missing.json"))
