"""The paths of evaluate.py as typed: results land in a folder named after the checkpoint and
the dataset (two datasets in a row keep both), and evaluation reads only the validation split
(a COCO config whose train paths do not exist evaluates; training on it still fails, naming
the key)."""

import json
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import compose, write_run_checkpoint

from segany.data import CocoDataModule
from segany.evaluation.runner import output_dir
from segany.evaluation.sources import dataset_configs

ROOT = Path(__file__).resolve().parents[1]


def _cfg(*overrides):
    return compose(*overrides, name="evaluate")


def _evaluate(cfg):
    sys.path.insert(0, str(ROOT))
    import evaluate as evaluate_script

    return evaluate_script.evaluate(cfg)


def _coco(root: Path, split: str):
    """A one-image COCO split: a 96x128 JPEG with two rectangles (polygons)."""
    (root / split).mkdir(parents=True)
    image = np.full((96, 128, 3), 40, np.uint8)
    image[10:40, 10:60] = (200, 60, 60)
    image[50:90, 70:120] = (60, 200, 60)
    cv2.imwrite(str(root / split / "a.jpg"), image[..., ::-1])
    boxes = [(10, 10, 60, 40), (70, 50, 120, 90)]  # x0, y0, x1, y1
    anns = [
        {
            "id": i + 1,
            "image_id": 1,
            "category_id": 1,
            "iscrowd": 0,
            "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
            "area": float((x1 - x0) * (y1 - y0)),
            "bbox": [x0, y0, x1 - x0, y1 - y0],
        }
        for i, (x0, y0, x1, y1) in enumerate(boxes)
    ]
    doc = {"images": [{"id": 1, "file_name": "a.jpg", "height": 96, "width": 128}], "annotations": anns}
    (root / "annotations").mkdir(exist_ok=True)
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps(doc))
    return path, root / split


def _fake_run(run_dir: Path) -> Path:
    return write_run_checkpoint(run_dir)


def test_one_checkpoint_on_two_datasets_keeps_both_results(tmp_path):
    ckpt = _fake_run(tmp_path / "runs" / "r")
    ann, images = _coco(tmp_path / "coco", "val2017")
    common = [
        f"checkpoint={ckpt}",
        "points.clicks=[1]",
        f"paths.root_dir={tmp_path}",
        f"paths.data_dir={tmp_path}/nowhere",
    ]
    synthetic = [
        f"data.root={tmp_path}/syn",
        "data.num_train=1",
        "data.num_val=1",
        "data.num_workers=0",
        "data.min_side=96",
        "data.max_side=128",
    ]
    # the COCO config's train paths (${paths.data_dir}/coco/...) do not exist: evaluation must not need them
    coco = ["data=coco", f"data.val_annotations={ann}", f"data.val_images={images}", "data.num_workers=0"]
    first = _evaluate(_cfg(*common, *synthetic))
    second = _evaluate(_cfg(*common, *coco))
    eval_dir = tmp_path / "runs" / "r" / "eval"
    assert sorted(os.listdir(eval_dir)) == ["last-coco-instances_val2017", "last-synthetic-syn"]
    kept = json.loads((eval_dir / "last-synthetic-syn" / "metrics.json").read_text())
    assert kept == json.loads(json.dumps(first))  # the second evaluation left the first one's result alone
    assert kept["data"] == {"synthetic": "segany.data.SyntheticDataModule"}
    saved = json.loads((eval_dir / "last-coco-instances_val2017" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(second))
    assert saved["data"] == {"coco": "segany.data.CocoDataModule"}
    assert saved["points"]["datasets"]["coco"]["num_masks"] == 2  # the two rectangles of the one image
    for d in ("last-synthetic-syn", "last-coco-instances_val2017"):
        assert (eval_dir / d / "results.md").is_file()


def test_default_output_dir_names_checkpoint_and_datasets(tmp_path):
    root = [f"paths.root_dir={tmp_path}", f"paths.data_dir={tmp_path}/d"]

    def out(*overrides):
        cfg = _cfg(*root, *overrides)
        return output_dir(cfg, dataset_configs(cfg))

    assert out() == f"{tmp_path}/eval/untrained-synthetic"  # data.root <data_dir>/synthetic adds nothing
    sam_coco = out("checkpoint=/w/sam_vit_b_01ec64.pth", "data=coco")
    assert sam_coco == f"{tmp_path}/eval/sam_vit_b_01ec64-coco-instances_val2017"
    lvis = out("checkpoint=/w/sam_vit_b_01ec64.pth", "data=coco", "data.val_annotations=/l/lvis_v1_val.json")
    assert lvis == f"{tmp_path}/eval/sam_vit_b_01ec64-coco-lvis_v1_val"
    assert out(
        "checkpoint='runs/x/checkpoints/step=10.ckpt'", "data=sa1b", "data.val_shards='/s/val/sa_{0..9}.tar'"
    ) == (os.path.abspath("runs/x/eval/step=10-sa1b-val"))
    two = "datasets={a: {_target_: segany.data.CocoDataModule}, b: {_target_: segany.data.CocoDataModule}}"
    assert out("checkpoint=runs/x/checkpoints/last.ckpt", two) == os.path.abspath("runs/x/eval/last-a+b")
    assert out("output_dir=/somewhere/else", two) == "/somewhere/else"


def test_coco_reads_only_the_split_its_stage_needs(tmp_path):
    ann, images = _coco(tmp_path / "coco", "val2017")
    missing = {"train_annotations": str(tmp_path / "no" / "train.json"), "train_images": str(tmp_path / "no")}
    dm = CocoDataModule(val_annotations=str(ann), val_images=str(images), num_workers=0, img_size=64, **missing)
    dm.setup("validate")  # evaluation: the missing training paths are never read
    assert dm.train_dataset is None and dm.val_dataset.image_ids == [1]
    with pytest.raises(FileNotFoundError, match=r"data\.train_annotations: annotation file .*train\.json"):
        dm.setup("fit")  # training: fails at setup, naming the key
    ann_train, _ = _coco(tmp_path / "coco", "train2017")
    no_images = CocoDataModule(train_annotations=str(ann_train), train_images=str(tmp_path / "no"), img_size=64)
    with pytest.raises(FileNotFoundError, match=r"data\.train_images: image folder .* does not exist"):
        no_images.setup("fit")
    val_only = CocoDataModule(val_annotations=str(ann), val_images=str(images), img_size=64)
    with pytest.raises(ValueError, match=r"data\.train_annotations is not set"):
        val_only.setup("fit")
    with pytest.raises(ValueError, match=r"neither data\.train_annotations nor data\.val_annotations"):
        CocoDataModule(img_size=64).setup()


def test_train_py_on_a_missing_train_split_names_the_key(tmp_path):
    """train.py with data=coco whose train paths do not exist stops before the first step."""
    sys.path.insert(0, str(ROOT))
    import train as train_script

    ann, images = _coco(tmp_path / "coco", "val2017")
    cfg = compose(
        "data=coco",
        f"data.train_annotations={tmp_path}/no/train.json",
        f"data.train_images={tmp_path}/no",
        f"data.val_annotations={ann}",
        f"data.val_images={images}",
        "data.num_workers=0",
        f"paths.root_dir={tmp_path}/runs",
        "trainer.max_steps=1",
        "~logger",
    )
    with pytest.raises(FileNotFoundError, match=r"data\.train_annotations"):
        train_script.train(cfg)
