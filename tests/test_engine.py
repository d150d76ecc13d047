"""The data engine: SA-1B-format shards that SA1BDataModule reads back, resuming after a
kill, the semi-automatic stage's prompts, and train -> annotate -> retrain end to end."""

import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from segany.data import SA1BDataModule
from segany.data.scenes import scene_samples
from segany.engine import SA1B_SETTINGS, AutoAnnotator, SemiAnnotator, plan_jobs, run_stage
from segany.engine.cli import main as engine_main

try:
    from _official import build_blob_sam, make_test_image, to_segany
except ImportError:  # tests/ imported as a package
    from tests._official import build_blob_sam, make_test_image, to_segany

ROOT = Path(__file__).resolve().parents[1]
RELAXED = dict(
    points_per_side=4, crop_n_layers=0, pred_iou_thresh=0.5, stability_score_thresh=0.5, min_mask_region_area=10
)


@pytest.fixture(scope="module")
def blob(tmp_path_factory):
    """segany vit_tiny with the blob weights: localised masks around each prompt point."""
    return to_segany(build_blob_sam(seed=0), tmp_path_factory.mktemp("w") / "blob.pth")


def _image_folder(path, n=5):
    os.makedirs(path, exist_ok=True)
    for key, _, jpg, _ in scene_samples(n, seed=3, min_side=96, max_side=128):
        (path / f"{key}.jpg").write_bytes(jpg)
    return path


def _members(tar_path):
    with tarfile.open(tar_path) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers()}


def test_sa1b_settings_are_the_papers():
    s = SA1B_SETTINGS
    assert (s["points_per_side"], s["crop_n_layers"], s["crop_n_points_downscale_factor"]) == (32, 2, 2)
    assert (
        s["pred_iou_thresh"],
        s["stability_score_thresh"],
        s["box_nms_thresh"],
        s["crop_nms_thresh"],
        s["min_mask_region_area"],
    ) == (0.88, 0.95, 0.7, 0.7, 100)


def test_auto_shards_read_back_and_a_killed_run_resumes(tmp_path, blob):
    images = _image_folder(tmp_path / "images", n=3)
    out = tmp_path / "engine"
    jobs = plan_jobs(str(images), shard_size=1)
    assert [j.name for j in jobs] == ["sa-000000.tar", "sa-000001.tar", "sa-000002.tar"]
    annotator = AutoAnnotator(blob, **RELAXED)
    calls = []

    def killed_in_shard_1(image, image_id, meta):
        calls.append(image_id)
        if len(calls) == 2:  # the image of the second shard
            raise KeyboardInterrupt
        return annotator(image, image_id, meta)

    with pytest.raises(KeyboardInterrupt):
        run_stage(jobs, killed_in_shard_1, str(out))
    assert sorted(os.listdir(out)) == ["sa-000000.stats.json", "sa-000000.tar"]
    first = os.stat(out / "sa-000000.tar")
    (out / "sa-000001.tar.tmp-4242").write_bytes(b"half a shard of a SIGKILLed run")

    calls.clear()
    totals = run_stage(
        plan_jobs(str(images), shard_size=1), lambda im, i, m: (calls.append(i), annotator(im, i, m))[1], str(out)
    )
    assert totals["skipped"] == 1 and totals["done"] == 2 and calls == [1, 2]
    assert os.stat(out / "sa-000000.tar").st_mtime_ns == first.st_mtime_ns
    assert not list(out.glob("*.tmp-*"))

    written = 0
    for shard in sorted(out.glob("*.tar")):
        members = _members(shard)
        for name, data in members.items():
            if not name.endswith(".json"):
                continue
            meta = json.loads(data)
            h, w = meta["image"]["height"], meta["image"]["width"]
            assert meta["annotations"], name
            for a in meta["annotations"]:
                assert {
                    "id",
                    "segmentation",
                    "bbox",
                    "area",
                    "predicted_iou",
                    "stability_score",
                    "point_coords",
                    "crop_box",
                } <= set(a)
                rle = {"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()}
                assert a["segmentation"]["size"] == [h, w] and int(mask_utils.area(rle)) == a["area"]
                assert a["area"] < 0.95 * h * w and a["predicted_iou"] > 0.5 and a["stability_score"] >= 0.5
            written += 1
    assert written == 3

    dm = SA1BDataModule(val_shards=str(out / "*.tar"), img_size=256, max_masks=8, batch_size=2, num_workers=0)
    dm.setup("validate")
    seen = 0
    for batch in dm.val_dataloader():
        assert batch["masks"].shape[-1] == 256 and batch["valid"].any(1).all()
        seen += batch["image"].shape[0]
        assert sum(batch["faults"].values()) == 0
    assert seen == written


def test_semi_prompts_only_the_unannotated_area(blob):
    image = make_test_image(120, 160)
    h, w = image.shape[:2]
    known = np.zeros((h, w), bool)
    known[:, : w // 2] = True  # the left half is annotated, confidently
    unsure = np.zeros((h, w), bool)
    unsure[90:110, 120:150] = True

    def ann(m, i, iou):
        r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        return {
            "id": 7 * 100_000 + i,
            "segmentation": {"size": [h, w], "counts": r["counts"].decode()},
            "area": int(m.sum()),
            "predicted_iou": iou,
            "stability_score": 0.99,
        }

    meta = {"annotations": [ann(known, 0, 0.95), ann(unsure, 1, 0.3)]}
    semi = SemiAnnotator(
        blob,
        points_per_side=8,
        pred_iou_thresh=0.5,
        stability_score_thresh=0.5,
        min_mask_region_area=0,
        max_overlap=0.5,
    )
    pts = semi.unannotated_points(known)
    assert len(pts) == 32 and (pts[:, 0] * w >= w // 2).all()  # the 8x8 grid's right half
    anns = semi(image, 7, meta)
    assert anns[0]["id"] == 700000 and all(a["id"] != 700001 or a is not meta["annotations"][1] for a in anns)
    new = anns[1:]
    assert new, "the blob model must add masks in the right half"
    assert len({a["id"] for a in anns}) == len(anns) and min(a["id"] for a in new) == 700002
    for a in new:
        x, y = a["point_coords"][0]
        assert x >= w // 2 and not known[int(y), int(x)]
        m = mask_utils.decode({"size": [h, w], "counts": a["segmentation"]["counts"].encode()}).astype(bool)
        assert (m & known).sum() <= 0.5 * m.sum()


def test_train_annotate_retrain_loop(tmp_path, monkeypatch):
    """Train a tiny SAM 1 step on synthetic scenes, annotate unlabelled images with it (auto
    stage, CLI), train again from its weights on the engine's shards alone."""
    from helpers import compose

    import segany

    sys.path.insert(0, str(ROOT))
    import train as train_script

    monkeypatch.setenv("WANDB_MODE", "offline")
    common = [
        f"paths.root_dir={tmp_path}",
        "trainer.max_steps=1",
        "logger=csv",
        "data.batch_size=2",
        "data.max_masks=4",
        "data.num_workers=0",
        "trainer.limit_val_batches=0",
        "optim.warmup_iters=0",
    ]
    cfg1 = compose(
        *common, "name=round0", f"data.root={tmp_path}/syn", "data.num_train=4", "data.num_val=2", "data.shard_size=2"
    )
    train_script.train(cfg1)
    ckpt = tmp_path / "round0" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()

    images = _image_folder(tmp_path / "unlabelled", n=3)
    assert (
        engine_main(
            [
                "auto",
                "--input",
                str(images),
                "--out",
                str(tmp_path / "engine"),
                "--checkpoint",
                str(ckpt),
                "--shard-size",
                "2",
                "--points-per-side",
                "4",
                "--crop-n-layers",
                "0",
                "--pred-iou-thresh",
                "0",
                "--stability-score-thresh",
                "0",
                "--min-mask-region-area",
                "0",
            ]
        )
        == 0
    )
    shards = sorted((tmp_path / "engine").glob("*.tar"))
    assert [s.name for s in shards] == ["sa-000000.tar", "sa-000001.tar"]

    from segany.modeling.checkpoint import load_model

    model, _ = load_model(str(ckpt))
    segany.save_official(model, str(tmp_path / "round0.pth"))
    cfg2 = compose(
        *common,
        "name=round1",
        "seed=1",
        "data=sa1b",
        f"data.train_shards='{tmp_path}/engine/sa-{{000000..000001}}.tar'",
        "data.img_size=${model.img_size}",
        "data.epoch_length=1",
        f"model.checkpoint={tmp_path}/round0.pth",
    )
    train_script.train(cfg2)
    assert (tmp_path / "round1" / "checkpoints" / "last.ckpt").is_file()
    retrained, _ = load_model(str(tmp_path / "round1" / "checkpoints" / "last.ckpt"))
    before, after = model.state_dict(), retrained.state_dict()
    # started from round 0's weights (round 0 was seeded 0, round 1 is seeded 1: the prompt encoder's
    # fixed random Fourier matrix matches only if it was loaded), and trained on
    assert torch.equal(
        before["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"],
        after["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"],
    )
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_precision_flag_reaches_the_mask_generator(blob):
    """--precision bf16: the annotators' generator runs its predictor in bf16 (default fp32)."""
    from segany.engine.cli import build_annotator, parser

    for stage, precision in (("auto", "bf16"), ("semi", "fp32")):
        extra = ["--precision", precision] if precision != "fp32" else []
        args = parser().parse_args([stage, "--input", "IN", "--out", "OUT", *extra])
        annotator = build_annotator(args, blob)
        assert annotator.settings["precision"] == precision
    auto = build_annotator(parser().parse_args(["auto", "--input", "IN", "--out", "OUT", "--precision", "bf16"]), blob)
    assert auto.generator.predictor.precision == "bf16"  # bf16 outputs: tests/test_inference.py
    with pytest.raises(SystemExit):
        parser().parse_args(["auto", "--input", "IN", "--out", "OUT", "--precision", "fp16"])
