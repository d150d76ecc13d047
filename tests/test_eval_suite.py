"""Evaluation suites (configs/eval_suite): one run over a suite's datasets writes a row per
dataset present and their mean, and lists the datasets missing on disk as skipped."""

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import compose

ROOT = Path(__file__).resolve().parents[1]

# the paper's 23 datasets (SAM paper, Table 7), as the suite's keys spell them
SAM23 = """ade20k bbbc038v1 cityscapes doors dram egohos gtea hypersim ibd ishape lvis ndd20 ndis_park ovis
ppdls plittersdorf streets timberseg trashcan visor woodscape pidray zerowaste_f""".split()

TRIO = """# @package _global_
defaults:
  - /data@datasets.syn: synthetic
  - /data@datasets.shapes: coco
  - /data@datasets.absent: coco
suite: trio
task: [points]
skip_missing: true
datasets:
  syn:
    root: ${paths.data_dir}/syn
    num_train: 2
    num_val: 3
    shard_size: 1
    num_workers: 0
    min_side: 96
    max_side: 128
    batch_size: 2
    max_masks: 3
  shapes:
    train_annotations: null
    train_images: null
    val_annotations: ${paths.data_dir}/shapes/annotations.json
    val_images: ${paths.data_dir}/shapes/images
    num_workers: 0
    batch_size: 2
    max_masks: 3
  absent:
    train_annotations: null
    train_images: null
    val_annotations: ${paths.data_dir}/absent/annotations.json
    val_images: ${paths.data_dir}/absent/images
"""


def write_coco_shapes(root: Path, n: int = 2) -> None:
    """n images (80 x 96) with two filled rectangles each, as COCO polygons."""
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    rng = np.random.default_rng(0)
    for i in range(1, n + 1):
        im = np.full((80, 96, 3), 40, np.uint8)
        for j, (x0, y0, w, h) in enumerate([(8, 10, 30, 24), (50, 36, 36, 34)]):
            x0, y0 = x0 + int(rng.integers(0, 6)), y0 + int(rng.integers(0, 6))
            im[y0 : y0 + h, x0 : x0 + w] = (200, 60 + 100 * j, 30)
            poly = [x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]
            anns.append(
                dict(id=10 * i + j, image_id=i, category_id=1, segmentation=[poly], area=w * h, bbox=[x0, y0, w, h])
            )
            anns[-1]["iscrowd"] = 0
        cv2.imwrite(str(root / "images" / f"{i:06d}.jpg"), im[..., ::-1])
        images.append(dict(id=i, file_name=f"{i:06d}.jpg", height=80, width=96))
    cats = [dict(id=1, name="box")]
    (root / "annotations.json").write_text(json.dumps(dict(images=images, annotations=anns, categories=cats)))


def _evaluate(cfg):
    sys.path.insert(0, str(ROOT))
    import evaluate as evaluate_script

    return evaluate_script.evaluate(cfg)


@pytest.fixture
def trio(tmp_path):
    (tmp_path / "conf" / "eval_suite").mkdir(parents=True)
    (tmp_path / "conf" / "eval_suite" / "trio.yaml").write_text(TRIO)
    write_coco_shapes(tmp_path / "data" / "shapes")
    return lambda *o: compose(
        "eval_suite=trio",
        f"hydra.searchpath=[file://{tmp_path}/conf]",
        f"paths.data_dir={tmp_path}/data",
        f"paths.root_dir={tmp_path}/runs",
        "points.clicks=[1,2]",
        *o,
        name="evaluate",
    )


def test_a_suite_writes_a_row_per_present_dataset_their_mean_and_the_skipped_one(trio, tmp_path):
    metrics = _evaluate(trio())
    out = tmp_path / "runs" / "eval" / "untrained-trio"  # the suite names the output folder
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert metrics["suite"] == "trio"
    assert list(metrics["skipped"]) == ["absent"] and "absent/annotations.json" in metrics["skipped"]["absent"]
    rows = metrics["points"]["datasets"]
    assert list(rows) == ["syn", "shapes"]
    assert rows["syn"]["num_images"] == 3 and rows["shapes"]["num_images"] == 2
    assert rows["shapes"]["num_masks"] == 4
    for k in ("miou@1", "miou@2", "miou_oracle@1"):
        assert metrics["points"]["mean"][k] == pytest.approx((rows["syn"][k] + rows["shapes"][k]) / 2, abs=1e-12)
    md = (out / "results.md").read_text()
    assert "Skipped (not on disk): absent" in md
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table] == ["dataset", "syn", "shapes", "**mean**"]
    assert (out / "points_miou_vs_clicks.png").is_file()

    # each row is that dataset evaluated on its own (no suite)
    data = tmp_path / "data" / "shapes"
    alone = _evaluate(
        compose(
            "data=coco",
            f"data.val_annotations={data}/annotations.json",
            f"data.val_images={data}/images",
            "data.num_workers=0",
            "data.batch_size=2",
            "data.max_masks=3",
            f"output_dir={tmp_path}/alone",
            "points.clicks=[1,2]",
            name="evaluate",
        )
    )
    for k in ("miou@1", "miou@2", "miou_oracle@2"):
        assert alone["points"]["datasets"]["coco"][k] == pytest.approx(rows["shapes"][k], abs=1e-9)


def test_without_skip_missing_a_missing_dataset_is_an_error_and_none_present_is_one_too(trio, tmp_path):
    with pytest.raises(FileNotFoundError, match="absent/annotations.json"):
        _evaluate(trio("skip_missing=false", "~datasets.syn", "~datasets.shapes"))
    with pytest.raises(FileNotFoundError, match="none of the datasets is on disk"):
        _evaluate(trio(f"paths.data_dir={tmp_path}/nowhere", "~datasets.syn"))


def test_sam23_lists_the_papers_datasets_as_coco_entries_under_data_dir():
    cfg = compose("eval_suite=sam23", "paths.data_dir=/DATA", name="evaluate")
    assert list(cfg.datasets) == SAM23 and cfg.suite == "sam23" and cfg.skip_missing
    for name, node in cfg.datasets.items():
        assert node._target_ == "segany.data.CocoDataModule"
        assert node.val_annotations == f"/DATA/{name}/annotations.json" and node.val_images == f"/DATA/{name}/images"


def test_interactive_suite_names_the_ritm_datasets(tmp_path):
    """The four RITM-layout datasets by their configs/data names (stand-ins for the ones this
    checkout lacks), with the points and noc tasks."""
    stub = tmp_path / "conf" / "data"
    stub.mkdir(parents=True)
    for name in ("grabcut", "berkeley", "davis", "sbd"):
        if not (ROOT / "configs" / "data" / f"{name}.yaml").is_file():
            (stub / f"{name}.yaml").write_text(f"_target_: stub.{name}\n")
    cfg = compose("eval_suite=interactive", f"hydra.searchpath=[file://{tmp_path}/conf]", name="evaluate")
    assert list(cfg.datasets) == ["grabcut", "berkeley", "davis", "sbd"]
    assert list(cfg.task) == ["points", "noc"] and cfg.suite == "interactive" and cfg.skip_missing
    search = f"hydra.searchpath=[file://{tmp_path}/conf]"
    assert compose("eval_suite=interactive", "task=points", search, name="evaluate").task == "points"
