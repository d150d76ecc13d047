"""SA1BDataModule on real tar shards: content, filters, faults, splits, errors at start."""

import logging
import os

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from segany.data import PIXEL_MEAN, PIXEL_STD, SA1BDataModule
from segany.data.scenes import make_scene
from segany.data.streams.shards import assign
from segany.testing.data import jpeg, member_offsets, rle_string, sa1b_json, write_tar


def scene(image_id, h=48, w=64, n=4):
    img, masks = make_scene(np.random.default_rng([7, image_id]), h, w, n, textures=("flat",))
    assert masks
    return img, masks


def pair(image_id, img, masks, **per_mask):
    return [(f"sa_{image_id}.jpg", jpeg(img)), (f"sa_{image_id}.json", sa1b_json(image_id, masks, **per_mask))]


def val_batches(spec, **kw):
    kw.setdefault("batch_size", 2)
    kw.setdefault("num_workers", 0)
    dm = SA1BDataModule(val_shards=spec, **kw)
    dm.setup("validate")
    return list(dm.val_dataloader())


def ids_of(batches):
    return [k for b in batches for k in b["image_id"]]


def test_batch_equals_encoded_masks_at_scale_one(tmp_path):
    """Long side == img_size: image and masks are the stored ones, zero-padded."""
    scenes = {i: scene(i, n=3 + 2 * i) for i in range(3)}
    write_tar(str(tmp_path / "s.tar"), [m for i, (img, ms) in scenes.items() for m in pair(i, img, ms)])
    (batch,) = val_batches(str(tmp_path / "s.tar"), img_size=64, batch_size=3, max_masks=64)
    assert set(batch) == {
        "image",
        "original_size",
        "input_size",
        "masks",
        "valid",
        "boxes",
        "mask_ids",
        "image_id",
        "faults",
    }
    n = max(len(ms) for _, ms in scenes.values())
    assert batch["image"].shape == (3, 3, 64, 64) and batch["image"].dtype == torch.float32
    assert batch["masks"].shape == (3, n, 64, 64) and batch["masks"].dtype == torch.bool
    assert batch["faults"] == {}
    for b, key in enumerate(batch["image_id"]):
        i = int(key.split("_")[1])
        img, masks = scenes[i]
        k = len(masks)
        assert batch["original_size"][b].tolist() == [48, 64] and batch["input_size"][b].tolist() == [48, 64]
        assert batch["valid"][b].tolist() == [True] * k + [False] * (n - k)
        assert batch["mask_ids"][b].tolist() == [i * 1000 + j for j in range(k)] + [-1] * (n - k)
        decoded = mask_utils.decode([{"size": [48, 64], "counts": rle_string(m)} for m in masks])
        expect = np.zeros((k, 64, 64), bool)
        expect[:, :48] = decoded.transpose(2, 0, 1)
        assert torch.equal(batch["masks"][b, :k], torch.from_numpy(expect))
        assert not batch["masks"][b, k:].any() and not batch["boxes"][b, k:].any()
        for j, m in enumerate(masks):  # COCO bbox -> inclusive xyxy
            x, y, bw, bh = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(m.astype(np.uint8))))
            assert batch["boxes"][b, j].tolist() == [x, y, x + bw - 1, y + bh - 1]
        stored = cv2.imdecode(np.frombuffer(jpeg(img), np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
        norm = (stored.astype(np.float32) - np.array(PIXEL_MEAN, np.float32)) / np.array(PIXEL_STD, np.float32)
        torch.testing.assert_close(batch["image"][b, :, :48], torch.from_numpy(norm.transpose(2, 0, 1)))
        assert not batch["image"][b, :, 48:].any()


def test_resized_masks_and_image(tmp_path):
    img, masks = scene(0, h=60, w=90, n=5)
    write_tar(str(tmp_path / "s.tar"), pair(0, img, masks))
    (batch,) = val_batches(str(tmp_path / "s.tar"), img_size=32)
    nh, nw = int(60 * 32 / 90 + 0.5), 32  # ResizeLongestSide rule
    assert batch["input_size"][0].tolist() == [nh, nw]
    for j, m in enumerate(masks):
        expect = cv2.resize(m.astype(np.uint8), (nw, nh), interpolation=cv2.INTER_NEAREST_EXACT).astype(bool)
        if expect.any():
            row = batch["mask_ids"][0].tolist().index(j)
            assert torch.equal(batch["masks"][0, row, :nh, :nw], torch.from_numpy(expect))
    ref = cv2.resize(
        cv2.imdecode(np.frombuffer(jpeg(img), np.uint8), cv2.IMREAD_COLOR), (nw, nh), interpolation=cv2.INTER_AREA
    )[..., ::-1].astype(np.float32)
    got = batch["image"][0, :, :nh, :nw].numpy().transpose(1, 2, 0) * PIXEL_STD + PIXEL_MEAN
    assert np.abs(got - ref).mean() < 4.0  # reduced JPEG decode vs area resize


def test_max_masks_samples_a_subset(tmp_path):
    img, masks = scene(0, n=8)
    write_tar(str(tmp_path / "s.tar"), pair(0, img, masks))
    (batch,) = val_batches(str(tmp_path / "s.tar"), img_size=64, max_masks=3)
    ids = batch["mask_ids"][0].tolist()
    assert len(ids) == 3 and len(set(ids)) == 3 and batch["valid"].all()
    for row, mid in enumerate(ids):
        m = np.zeros((64, 64), bool)
        m[:48] = masks[mid % 1000]
        assert torch.equal(batch["masks"][0, row], torch.from_numpy(m))
    again = val_batches(str(tmp_path / "s.tar"), img_size=64, max_masks=3)
    assert again[0]["mask_ids"][0].tolist() == ids  # validation sampling is deterministic


def test_filters(tmp_path):
    h, w = 40, 50
    masks = [np.zeros((h, w), bool) for _ in range(6)]
    masks[0][:38, :] = True  # 95% of the image: paper filter
    masks[1][5:7, 5:7] = True  # 4 px: min_area
    masks[2][10:20, 10:20] = True  # low predicted_iou
    masks[3][20:30, 20:30] = True  # low stability_score
    masks[4][0:10, 30:45] = True  # crowd
    masks[5][25:35, 5:15] = True  # passes everything
    img = np.full((h, w, 3), 90, np.uint8)
    meta = sa1b_json(
        1,
        masks,
        predicted_iou=[0.99, 0.99, 0.5, 0.99, 0.99, 0.99],
        stability_score=[0.99, 0.99, 0.99, 0.6, 0.99, 0.99],
        iscrowd=[0, 0, 0, 0, 1, 0],
    )
    write_tar(str(tmp_path / "f.tar"), [("sa_1.jpg", jpeg(img)), ("sa_1.json", meta)])

    def kept(**kw):
        (batch,) = val_batches(str(tmp_path / "f.tar"), img_size=64, **kw)
        return sorted(i % 1000 for i in batch["mask_ids"][0].tolist() if i >= 0)

    assert kept() == [1, 2, 3, 5]
    assert kept(max_area_frac=1.0) == [0, 1, 2, 3, 5]
    assert kept(min_area=5, min_predicted_iou=0.88, min_stability_score=0.95) == [5]
    assert kept(include_crowd=True) == [1, 2, 3, 4, 5]


def test_every_fault_skipped_counted_once_and_warned(tmp_path, caplog):
    good = {i: scene(i) for i in range(10)}
    members = pair(0, *good[0])
    img1, m1 = good[1]
    members += [("sa_1.jpg", jpeg(img1)[:300]), ("sa_1.json", sa1b_json(1, m1))]  # truncated JPEG
    members += [
        ("sa_2.jpg", b"\xff\xd8" + os.urandom(500) + b"\xff\xd9"),  # corrupt JPEG
        ("sa_2.json", sa1b_json(2, good[2][1])),
    ]
    members += pair(3, *good[3])
    bad_rle = sa1b_json(4, good[4][1])
    bad_rle["annotations"][1]["segmentation"]["counts"] += "1"  # invalid RLE
    members += [("sa_4.jpg", jpeg(good[4][0])), ("sa_4.json", bad_rle)]
    no_seg = sa1b_json(5, good[5][1])
    del no_seg["annotations"][0]["segmentation"]  # missing field
    members += [("sa_5.jpg", jpeg(good[5][0])), ("sa_5.json", no_seg)]
    members += [("sa_6.jpg", jpeg(good[6][0])), ("sa_6.json", b'{"image": {"width": 64, "height": 4')]  # bad json
    empty = sa1b_json(7, good[7][1])
    empty["annotations"] = []  # no annotations
    members += [("sa_7.jpg", jpeg(good[7][0])), ("sa_7.json", empty)]
    members += [("sa_8.jpg", jpeg(good[8][0]))]  # orphan jpg
    members += [("sa_9.json", sa1b_json(9, good[9][1]))]  # orphan json
    members += pair(10, *scene(10))
    write_tar(str(tmp_path / "a.tar"), members)
    write_tar(str(tmp_path / "b.tar"), pair(11, *scene(11)) + pair(12, *scene(12)) + pair(13, *scene(13)))
    _, data_at, size = member_offsets(str(tmp_path / "b.tar"))["sa_13.json"]
    with open(tmp_path / "b.tar", "r+b") as f:  # cut short mid-member
        f.truncate(data_at + size // 2)
    write_tar(str(tmp_path / "c.tar"), pair(14, *scene(14)))
    caplog.set_level(logging.WARNING, "segany.data")
    batches = val_batches(str(tmp_path / "{a,b,c}.tar"), img_size=64, batch_size=2)
    assert ids_of(batches) == ["sa_0", "sa_3", "sa_10", "sa_11", "sa_12", "sa_14"]  # the rest is never lost
    total = {}
    for b in batches:
        for kind, count in b["faults"].items():
            total[kind] = total.get(kind, 0) + count
    assert total == {"bad_image": 2, "bad_json": 3, "no_annotations": 1, "orphan": 2, "truncated_tar": 1}
    assert batches[0]["faults"]["bad_image"] == 2  # counts ride with this worker's batches
    text = caplog.text
    for key in ("sa_1", "sa_2", "sa_4", "sa_5", "sa_6", "sa_7", "sa_8", "sa_9", "sa_13"):
        assert f"key {key}" in text
    assert "a.tar" in text and "b.tar" in text and "annotations[0]: missing field 'segmentation'" in text
    assert "invalid RLE" in text


def test_shard_split_disjoint_and_covering():
    for n in (1, 3, 7, 16):
        for slots in (1, 2, 5, 8):
            parts = [assign(n, s, slots) for s in range(slots)]
            flat = [i for p in parts for i in p]
            assert sorted(flat) == list(range(n))  # disjoint and covering
            covered = [assign(n, s, slots, cover=True) for s in range(slots)]
            assert all(covered) and all(set(p) <= set(c) for p, c in zip(parts, covered))


def test_rank_worker_readers_disjoint_and_covering(tmp_path):
    expect = []
    for s in range(5):
        members = []
        for i in range(3):
            members += pair(10 * s + i, *scene(10 * s + i))
            expect.append(f"sa_{10 * s + i}")
        write_tar(str(tmp_path / f"sa_{s:06d}.tar"), members)
    seen = []
    for rank in range(2):
        os.environ.update(RANK=str(rank), WORLD_SIZE="2")  # no trainer, no process group: env
        try:
            ids = ids_of(val_batches(str(tmp_path / "sa_{000000..000004}.tar"), img_size=64, num_workers=2))
        finally:
            del os.environ["RANK"], os.environ["WORLD_SIZE"]
        seen.append(ids)
    assert sorted(seen[0] + seen[1]) == sorted(expect)
    assert not set(seen[0]) & set(seen[1])
    # slot = rank * workers + worker owns shards slot, slot + 4, ...: rank 0 has shards 0, 1, 4
    assert sorted(seen[0]) == sorted(f"sa_{10 * s + i}" for s in (0, 1, 4) for i in range(3))


def test_bad_shard_specs_fail_at_start(tmp_path):
    write_tar(str(tmp_path / "sa_000000.tar"), pair(0, *scene(0)))
    with pytest.raises(FileNotFoundError, match="matches no shard"):
        SA1BDataModule(str(tmp_path / "nothing_*.tar"), epoch_length=1).setup("fit")
    with pytest.raises(FileNotFoundError, match=r"1 missing \(e\.g\. .*sa_000001\.tar"):
        SA1BDataModule(str(tmp_path / "sa_{000000..000001}.tar"), epoch_length=1).setup("fit")
    os.mkdir(tmp_path / "sa_000002.tar")
    with pytest.raises(FileNotFoundError, match="unreadable"):
        SA1BDataModule(val_shards=[str(tmp_path / "sa_000000.tar"), str(tmp_path / "sa_000002.tar")]).setup()
    with pytest.raises(FileNotFoundError, match="missing"):
        SA1BDataModule(val_shards="memory://nowhere/sa_{0..2}.tar").setup()


def test_pipe_and_glob_specs(tmp_path):
    write_tar(str(tmp_path / "sa_000000.tar"), pair(0, *scene(0)) + pair(1, *scene(1)))
    assert ids_of(val_batches(f"pipe:cat {tmp_path}/sa_000000.tar", img_size=64)) == ["sa_0", "sa_1"]
    assert ids_of(val_batches(str(tmp_path / "sa_*.tar"), img_size=64)) == ["sa_0", "sa_1"]


def test_lowres_targets(tmp_path):
    img, masks = scene(0, h=60, w=90, n=5)
    write_tar(str(tmp_path / "s.tar"), pair(0, img, masks))
    (batch,) = val_batches(str(tmp_path / "s.tar"), img_size=64, lowres_targets=True)
    low = batch["masks_lowres"]
    assert low.shape == (1, batch["masks"].shape[1], 16, 16) and low.dtype == torch.bool
    frac = batch["masks"].float().reshape(1, -1, 16, 4, 16, 4).mean((3, 5))
    assert torch.equal(low, frac > 0.5)


def test_odd_json_types_and_unforeseen_errors_are_counted_not_raised(tmp_path):
    img, masks = scene(0)
    odd_size = sa1b_json(1, masks)
    odd_size["annotations"][0]["segmentation"]["size"] = 48  # not a list
    odd_ann = sa1b_json(2, masks)
    odd_ann["annotations"][1] = "not an annotation"
    huge = sa1b_json(3, masks)
    huge["image"]["height"] = 2**70  # overflows int64 later on
    for ann in huge["annotations"]:
        ann["segmentation"]["size"] = [2**70, 64]
    members = [
        ("sa_1.jpg", jpeg(img)),
        ("sa_1.json", odd_size),
        ("sa_2.jpg", jpeg(img)),
        ("sa_2.json", odd_ann),
        ("sa_3.jpg", jpeg(img)),
        ("sa_3.json", huge),
    ] + pair(4, img, masks)
    write_tar(str(tmp_path / "o.tar"), members)
    (batch,) = val_batches(str(tmp_path / "o.tar"), img_size=64)
    assert batch["image_id"] == ["sa_4"]
    assert batch["faults"] == {"bad_json": 2, "sample_error": 1}
