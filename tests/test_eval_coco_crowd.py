"""COCO ground truth in the proposals and instances tasks, against pycocotools' COCOeval run
directly on the same instance json and the same detections (written from the task's output):
crowd regions stay in the ground truth as iscrowd=1 (a detection on one is ignored, never a
false positive), are never a point-prompt target, the json's areas decide the area ranges, and
images without annotations are scored. The masks come from a stand-in segmenter (each box
filled) so that the scores are not trivial; what is under test is the ground truth path.

Always: a small json this test writes (polygons, an uncompressed crowd RLE, an image without
annotations, a json area in another COCO area range than its polygon's). Opt-in: real COCO 2017
annotations in ../shared/data/coco_tiny (skipped with the reason when absent)."""

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import segany.evaluation.instances as instances_mod
from segany.data import CocoDataModule
from segany.evaluation import points
from segany.evaluation.instances import InstancesTask, gt_box_detections
from segany.evaluation.proposals import proposals_merge, proposals_part
from segany.evaluation.sources import eval_images
from segany.testing.data import png

COCO_TINY = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "coco_tiny"
AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
AR_KEYS = ("AR@10", "AR@100", "AR@1000", "AR_s@1000", "AR_m@1000", "AR_l@1000")


# -- a stand-in model: each box prompt gives the filled box ------------------------------------
class BoxPredictor:
    def __init__(self, model=None):
        self.original_size = None

    def set_image(self, image):
        self.original_size = image.shape[:2]

    def reset_image(self):
        self.original_size = None


def box_masks(predictor, boxes_xyxy, refine=True, multimask_first=False, batch=64):
    H, W = predictor.original_size
    out = np.zeros((len(boxes_xyxy), H, W), bool)
    for i, (x0, y0, x1, y1) in enumerate(np.round(boxes_xyxy).astype(int)):
        out[i, max(y0, 0) : y1, max(x0, 0) : x1] = True
    return out


@pytest.fixture()
def box_model(monkeypatch):
    monkeypatch.setattr(instances_mod, "SamPredictor", BoxPredictor)
    monkeypatch.setattr(instances_mod, "segment_boxes", box_masks)


def _cfg(**kw):
    base = {
        "max_images": None,
        "instances": {"detections": "gt_boxes", "min_score": 0.0, "refine": True, "multimask_first": False},
        "proposals": {
            "points_per_side": 4,
            "points_per_batch": 16,
            "nms_thresh": 0.9,
            "top_k": 1000,
            "max_dets": [10, 100, 1000],
        },
    }
    return OmegaConf.merge(base, kw)


def _datamodule(annotations, images):
    dm = CocoDataModule(val_annotations=str(annotations), val_images=str(images), num_workers=0, img_size=64)
    dm.setup("validate")
    return dm


def _instances(tmp_path, dm, detections=None, max_images=None):
    """The instances task on dm (every image, box stand-in): -> (its metrics, its detections)."""
    inst = {"detections": "gt_boxes"}
    if detections is not None:
        path = tmp_path / f"dets{len(list(tmp_path.glob('dets*.json')))}.json"
        path.write_text(json.dumps(detections))
        inst = {"detections": str(path)}
    task = InstancesTask(_cfg(max_images=max_images, instances=inst), None, "cpu", str(tmp_path))
    part = task.part("coco", dm, 0, 1)
    return task.merge([part]), part


def cocoeval_direct(gt_json, dets, img_ids, use_cats=True, max_dets=(1, 10, 100)) -> np.ndarray:
    """COCOeval segm on the json file as it is, restricted to img_ids: its 12 summary stats."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_json))
        ev = COCOeval(gt, gt.loadRes([dict(d) for d in dets]), "segm")
        ev.params.imgIds = sorted(img_ids)
        ev.params.useCats = int(use_cats)
        ev.params.maxDets = list(max_dets)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def _assert_same(ours: dict, stats, keys, offset=0):
    for i, k in enumerate(keys):
        ref = stats[offset + i]
        assert ours[k] == pytest.approx(ref if ref > -1 else float("nan"), abs=1e-9, nan_ok=True), k


def _rle_str(mask):
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(r["size"]), "counts": r["counts"].decode()}


# -- a small COCO json with a crowd region --------------------------------------------------
H, W = 60, 90


@pytest.fixture()
def small_coco(tmp_path):
    """Image 1: two people (polygons) and a crowd of people (uncompressed RLE, as COCO stores
    them); image 2: a dog whose json area (2000, medium) is not its polygon's (900, small);
    image 3: no annotation."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in (1, 2, 3):
        (images / f"{i:012d}.png").write_bytes(png(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)))
    crowd = np.zeros((H, W), np.uint8)
    crowd[35:58, 40:88] = 1
    crowd_counts = [int(c) for c in np.diff(np.r_[0, np.flatnonzero(np.diff(np.r_[0, crowd.T.ravel(), 0])), H * W])]

    def poly(x0, y0, x1, y1):
        return [[x0, y0, x1, y0, x1, y1, x0, y1]]

    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": poly(5, 5, 25, 40), "area": 700.0},
        {"id": 2, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": poly(40, 5, 70, 30), "area": 750.0},
        {
            "id": 3,
            "image_id": 1,
            "category_id": 1,
            "iscrowd": 1,
            "segmentation": {"size": [H, W], "counts": crowd_counts},
            "area": float(crowd.sum()),
        },
        {"id": 4, "image_id": 2, "category_id": 18, "iscrowd": 0, "segmentation": poly(10, 10, 40, 40), "area": 2000.0},
    ]
    for a in anns:
        if a["iscrowd"]:
            a["bbox"] = [float(v) for v in mask_utils.toBbox(mask_utils.frPyObjects(a["segmentation"], H, W))]
        else:
            x0, y0, x1, y1 = a["segmentation"][0][0], a["segmentation"][0][1], *a["segmentation"][0][4:6]
            a["bbox"] = [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]
    data = {
        "images": [{"id": i, "file_name": f"{i:012d}.png", "height": H, "width": W} for i in (1, 2, 3)],
        "annotations": anns,
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path, images, crowd.astype(bool)


def test_ground_truth_keeps_crowd_json_area_and_empty_images(small_coco):
    path, images, crowd = small_coco
    dm = _datamodule(path, images)
    evs = {e.image_id: e for e in eval_images(dm, every_image=True)}
    assert sorted(evs) == [1, 2, 3] and evs[3].anns == []
    assert [e.image_id for e in eval_images(dm)] == [1, 2]  # the other tasks: images with objects
    by_id = {a["id"]: a for e in evs.values() for a in e.anns}
    assert [by_id[i]["iscrowd"] for i in (1, 2, 3, 4)] == [0, 0, 1, 0]
    assert np.array_equal(mask_utils.decode(by_id[3]["segmentation"]).astype(bool), crowd)
    assert by_id[4]["area"] == 2000.0 and by_id[4]["category_id"] == 18  # the json's, as COCOeval reads it
    assert [d["bbox"] for d in gt_box_detections(evs[1])] == [by_id[1]["bbox"], by_id[2]["bbox"]]  # no crowd box


def test_instances_ap_equals_cocoeval_and_a_crowd_detection_is_ignored(tmp_path, small_coco, box_model):
    path, images, crowd = small_coco
    dm = _datamodule(path, images)
    boxes = [  # a detector: two good boxes, one loose box, the dog
        {"image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 35], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [38, 3, 34, 30], "score": 0.6},
        {"image_id": 2, "category_id": 18, "bbox": [12, 10, 28, 30], "score": 0.8},
    ]
    base, part = _instances(tmp_path, dm, boxes)
    _assert_same(base, cocoeval_direct(path, part["dets"], [1, 2, 3]), AP_KEYS)
    assert 0 < base["AP"] < 1 and np.isnan(base["APl"]) and base["APm"] > 0  # the dog is medium by its json area

    on_crowd = {"image_id": 1, "category_id": 1, "bbox": [40, 35, 48, 23], "score": 0.95}  # exactly the crowd
    with_crowd, part = _instances(tmp_path, dm, boxes + [on_crowd])
    crowd_det = [d for d in part["dets"] if d["score"] == 0.95]
    assert np.array_equal(mask_utils.decode(crowd_det[0]["segmentation"]).astype(bool), crowd)
    _assert_same(with_crowd, cocoeval_direct(path, part["dets"], [1, 2, 3]), AP_KEYS)
    assert with_crowd["AP"] == base["AP"]  # ignored, as COCOeval ignores it

    # the same box where there is no crowd (image 3, no ground truth) is a false positive
    elsewhere, part = _instances(tmp_path, dm, boxes + [dict(on_crowd, image_id=3)])
    _assert_same(elsewhere, cocoeval_direct(path, part["dets"], [1, 2, 3]), AP_KEYS)
    assert elsewhere["AP"] < base["AP"]


def test_proposals_ar_equals_cocoeval_with_a_crowd_proposal(small_coco):
    path, images, crowd = small_coco
    dm = _datamodule(path, images)

    class Generator:  # box masks of the GT boxes, shifted, and the crowd region itself
        def generate(self, image):
            recs = []
            for i, (x, y, w, h) in enumerate(([5, 5, 20, 35], [42, 8, 30, 25], [12, 12, 28, 28], [40, 35, 48, 23])):
                m = np.zeros(image.shape[:2], bool)
                m[y : y + h, x : x + w] = True
                recs.append({"segmentation": _rle_str(m), "predicted_iou": 0.9 - 0.1 * i, "stability_score": 0.9})
            return recs

    part = proposals_part(Generator(), eval_images(dm))
    ours = proposals_merge([part])
    assert len(part["dets"]) == 2 * 4
    stats = cocoeval_direct(path, part["dets"], [e["id"] for e in part["images"]], False, (10, 100, 1000))
    _assert_same(ours, stats, AR_KEYS, offset=6)
    assert 0 < ours["AR@10"] < 1


def test_points_refuses_crowd_targets(small_coco):
    path, images, _ = small_coco
    dm = CocoDataModule(val_annotations=str(path), val_images=str(images), num_workers=0, img_size=64, val_batch_size=2)
    dm.setup("validate")
    (batch,) = list(dm.val_dataloader())
    assert batch["image_id"] == ["1", "2"] and batch["mask_ids"].tolist()[0][:2] == [1, 2]
    assert 3 not in batch["mask_ids"].tolist()[0]  # the crowd is no mask of the points task's batches
    crowd_dm = CocoDataModule(
        val_annotations=str(path), val_images=str(images), num_workers=0, img_size=64, include_crowd=True
    )
    crowd_dm.setup("validate")
    with pytest.raises(ValueError, match="include_crowd=true"):
        points.points_part(None, crowd_dm, points.ClickProtocol(), "cpu")


# -- real COCO 2017 annotations (opt-in) -------------------------------------------------------
@pytest.fixture(scope="module")
def coco_tiny():
    ann = COCO_TINY / "annotations" / "instances_val2017.json"
    if not ann.is_file():
        pytest.skip(f"real COCO subset not present: {ann} (see ../shared/data/SOURCES.md)")
    return ann.resolve(), (COCO_TINY / "val2017").resolve()


N_REAL = 8  # the first 8 val2017 images by id: 000000005001 has a crowd of people


def _real_detections(ann_path, n):
    """A detector on the first n images: every non-crowd box grown by 10% with a score from its
    rank, and the crowd regions' boxes; -> (boxes, crowd boxes, the crowd masks by image)."""
    data = json.loads(Path(ann_path).read_text())
    ids = sorted(i["id"] for i in data["images"])[:n]
    rng = np.random.default_rng(0)
    boxes, crowd_boxes = [], []
    for a in sorted(data["annotations"], key=lambda a: a["id"]):
        if a["image_id"] not in ids:
            continue
        x, y, w, h = a["bbox"]
        if a["iscrowd"]:
            crowd_boxes.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"]})
        else:
            g = 0.05 * np.array([w, h])
            box = [x - g[0], y - g[1], w + 2 * g[0], h + 2 * g[1]]
            boxes.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": box})
    for b in boxes:
        b["score"] = float(rng.uniform(0.05, 0.9))
    return ids, boxes, crowd_boxes


def test_real_coco_instances_ap_equals_cocoeval(tmp_path, coco_tiny, box_model):
    ann, images = coco_tiny
    dm = _datamodule(ann, images)
    ids, boxes, crowd_boxes = _real_detections(ann, N_REAL)
    assert crowd_boxes, "the subset is expected to hold a crowd region"
    base, part = _instances(tmp_path, dm, boxes, max_images=N_REAL)
    assert sorted(i["id"] for i in part["images"]) == ids
    assert sum(a["iscrowd"] for a in part["gt"]) == len(crowd_boxes)
    _assert_same(base, cocoeval_direct(ann, part["dets"], ids), AP_KEYS)
    assert 0.1 < base["AP"] < 0.9

    # a detection exactly on each crowd region (its RLE, top score) does not lower AP
    truth = COCO(str(ann))
    crowd_dets = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "score": 0.99, "segmentation": _rle_str(m)}
        for a in truth.dataset["annotations"]
        if a["iscrowd"] and a["image_id"] in ids
        for m in [truth.annToMask(a).astype(bool)]
    ]
    ours = instances_mod.instances_merge([dict(part, dets=part["dets"] + crowd_dets)])
    _assert_same(ours, cocoeval_direct(ann, part["dets"] + crowd_dets, ids), AP_KEYS)
    assert ours["AP"] == base["AP"]
    # the same masks moved off the crowd (flipped upside down) are false positives
    flipped = [dict(d, segmentation=_rle_str(mask_utils.decode(d["segmentation"])[::-1])) for d in crowd_dets]
    assert instances_mod.instances_merge([dict(part, dets=part["dets"] + flipped)])["AP"] < base["AP"]

    # the task's own crowd-box detections (the box-filling stand-in covers the crowd and more): as COCOeval
    with_boxes, part = _instances(tmp_path, dm, boxes + [dict(b, score=0.99) for b in crowd_boxes], N_REAL)
    _assert_same(with_boxes, cocoeval_direct(ann, part["dets"], ids), AP_KEYS)


def test_real_coco_gt_boxes_and_proposals_equal_cocoeval(tmp_path, coco_tiny, box_model):
    ann, images = coco_tiny
    dm = _datamodule(ann, images)
    ours, part = _instances(tmp_path, dm, None, max_images=N_REAL)  # the oracle detector (GT boxes)
    ids = [i["id"] for i in part["images"]]
    assert len(part["dets"]) == sum(1 for a in part["gt"] if not a["iscrowd"])  # no crowd box prompts
    _assert_same(ours, cocoeval_direct(ann, part["dets"], ids), AP_KEYS)

    class Generator:  # the same box masks as proposals, scores falling with their order
        def generate(self, image):
            ev = next(e for e in evs if e.image.shape == image.shape and np.array_equal(e.image, image))
            m = box_masks(type("P", (), {"original_size": image.shape[:2]})(), _xyxy(gt_box_detections(ev)))
            return [
                {"segmentation": _rle_str(x), "predicted_iou": 1.0 / (1 + i), "stability_score": 0.5}
                for i, x in enumerate(m)
            ]

    evs = list(eval_images(dm, max_images=N_REAL))
    part = proposals_part(Generator(), evs)
    ours = proposals_merge([part], (10, 100, 1000))
    stats = cocoeval_direct(ann, part["dets"], [e.image_id for e in evs], False, (10, 100, 1000))
    _assert_same(ours, stats, AR_KEYS, offset=6)
    assert 0 < ours["AR@10"] < 1


def _xyxy(dets):
    xywh = np.array([d["bbox"] for d in dets], np.float64).reshape(-1, 4)
    return np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
