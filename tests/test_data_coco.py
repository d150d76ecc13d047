"""COCO / LVIS json through pycocotools; conversion to shards reads back equal."""

import json
import os

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from segany.data import CocoDataModule, SA1BDataModule
from segany.data.make_shards import main as make_shards
from segany.testing.data import jpeg, png


def _rle(mask):
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


@pytest.fixture()
def coco_dir(tmp_path):
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    h, w = 60, 80
    for name, enc in (("a.jpg", jpeg), ("b.png", png), ("c.jpg", jpeg)):
        with open(images / name, "wb") as f:
            f.write(enc(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)))
    blob = np.zeros((h, w), np.uint8)
    cv2.circle(blob, (50, 30), 12, 1, -1)
    compressed = _rle(blob)
    crowd = np.zeros((h, w), np.uint8)
    crowd[40:58, 5:30] = 1
    crowd_counts = [int(c) for c in np.diff(np.r_[0, np.flatnonzero(np.diff(np.r_[0, crowd.T.ravel(), 0])), h * w])]
    anns = [
        {
            "id": 1,
            "image_id": 10,
            "category_id": 1,
            "iscrowd": 0,  # polygon in two parts
            "segmentation": [[5, 5, 30, 5, 30, 25], [40, 40, 60, 40, 60, 55, 40, 55]],
            "area": 0,
            "bbox": [0, 0, 1, 1],
        },
        {
            "id": 2,
            "image_id": 10,
            "category_id": 1,
            "iscrowd": 0,  # compressed RLE
            "segmentation": {"size": [h, w], "counts": compressed["counts"].decode()},
            "area": 0,
            "bbox": [0, 0, 1, 1],
        },
        {
            "id": 3,
            "image_id": 10,
            "category_id": 2,
            "iscrowd": 1,  # crowd: uncompressed RLE
            "segmentation": {"size": [h, w], "counts": crowd_counts},
            "area": 0,
            "bbox": [0, 0, 1, 1],
        },
        {
            "id": 4,
            "image_id": 10,
            "category_id": 1,
            "iscrowd": 0,  # degenerate polygon
            "segmentation": [[1, 1, 2, 2]],
            "area": 0,
            "bbox": [0, 0, 1, 1],
        },
        {
            "id": 5,
            "image_id": 11,
            "category_id": 1,
            "iscrowd": 0,
            "segmentation": [[10, 10, 70, 12, 40, 50]],
            "area": 0,
            "bbox": [0, 0, 1, 1],
        },
    ]
    data = {
        "images": [
            {"id": 10, "file_name": "a.jpg", "height": h, "width": w},
            {"id": 11, "file_name": "b.png", "height": h, "width": w},
            {"id": 12, "file_name": "c.jpg", "height": h, "width": w},
        ],  # no annotations
        "annotations": anns,
        "categories": [{"id": 1, "name": "x"}, {"id": 2, "name": "y"}],
    }
    with open(tmp_path / "instances.json", "w") as f:
        json.dump(data, f)
    return tmp_path


def coco_batches(root, annotations="instances.json", **kw):
    kw = {"batch_size": 2, "num_workers": 0, "img_size": 80, **kw}
    dm = CocoDataModule(val_annotations=str(root / annotations), val_images=str(root / "images"), **kw)
    dm.setup("validate")
    return list(dm.val_dataloader())


def test_polygons_rle_and_crowd_as_pycocotools_decodes(coco_dir):
    (batch,) = coco_batches(coco_dir)
    assert batch["image_id"] == ["10", "11"]  # image 12 has no annotation
    assert batch["faults"] == {"bad_annotation": 1}  # the 2-point polygon
    truth = COCO(str(coco_dir / "instances.json"))
    for b, img_id in enumerate((10, 11)):
        ids = [i for i in batch["mask_ids"][b].tolist() if i >= 0]
        assert ids == {10: [1, 2], 11: [5]}[img_id]  # crowd (3) left out
        for row, ann_id in enumerate(ids):
            expect = np.zeros((80, 80), bool)
            expect[:60] = truth.annToMask(truth.anns[ann_id]).astype(bool)
            assert torch.equal(batch["masks"][b, row], torch.from_numpy(expect))
    (with_crowd,) = coco_batches(coco_dir, include_crowd=True)
    assert [i for i in with_crowd["mask_ids"][0].tolist() if i >= 0] == [1, 2, 3]
    crowd = np.zeros((80, 80), bool)
    crowd[40:58, 5:30] = True
    assert torch.equal(with_crowd["masks"][0, 2], torch.from_numpy(crowd))


def test_lvis_style_images_found_from_coco_url(coco_dir):
    with open(coco_dir / "instances.json") as f:
        data = json.load(f)
    for img in data["images"]:
        img["coco_url"] = "http://images.cocodataset.org/val2017/" + img.pop("file_name")
    for ann in data["annotations"]:
        ann.pop("iscrowd")
    with open(coco_dir / "lvis.json", "w") as f:
        json.dump(data, f)
    (batch,) = coco_batches(coco_dir, "lvis.json")
    assert batch["image_id"] == ["10", "11"] and batch["valid"].sum().item() == 4  # 3 is no crowd in LVIS


def test_bad_json_fails_at_start_naming_file_and_field(coco_dir):
    with open(coco_dir / "broken.json", "w") as f:
        json.dump({"images": []}, f)
    with pytest.raises(ValueError, match=r"broken\.json: missing list field 'annotations'"):
        coco_batches(coco_dir, "broken.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        coco_batches(coco_dir, "missing.json")


def test_unreadable_image_is_a_fault(coco_dir):
    os.remove(coco_dir / "images" / "b.png")
    (batch,) = coco_batches(coco_dir)
    assert batch["image_id"] == ["10"] and batch["faults"] == {"bad_annotation": 1, "bad_image": 1}


def test_converted_shards_read_back_equal(coco_dir, capsys):
    out = coco_dir / "shards"
    make_shards(
        [
            "coco",
            str(out),
            "--images",
            str(coco_dir / "images"),
            "--annotations",
            str(coco_dir / "instances.json"),
            "--shard-size",
            "1",
        ]
    )
    assert "wrote 2 images to 2 shards" in capsys.readouterr().out
    dm = SA1BDataModule(
        val_shards=str(out / "sa-{000000..000001}.tar"),
        batch_size=2,
        num_workers=0,
        img_size=64,
        include_crowd=True,
        max_masks=2,
        lowres_targets=True,
    )
    dm.setup("validate")
    (from_shards,) = list(dm.val_dataloader())
    (from_coco,) = coco_batches(coco_dir, img_size=64, include_crowd=True, max_masks=2, lowres_targets=True)
    assert from_shards.keys() == from_coco.keys()
    for key, value in from_coco.items():
        if key != "faults":
            assert torch.equal(value, from_shards[key]) if torch.is_tensor(value) else value == from_shards[key], key


def test_training_stream_covers_the_images(coco_dir):
    dm = CocoDataModule(
        train_annotations=str(coco_dir / "instances.json"),
        train_images=str(coco_dir / "images"),
        batch_size=1,
        num_workers=0,
        img_size=64,
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 2
    assert sorted(k for b in loader for k in b["image_id"]) == ["10", "11"]
