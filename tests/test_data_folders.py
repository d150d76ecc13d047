"""Your own data (segany.data.FolderDataModule, make_shards binary_pngs / instance_pngs / labelme) on
files the test writes: each format reads back the masks that were written (datamodule batches, and
shards read by SA1BDataModule), a bad file of each kind is skipped, counted and named, labelme's
group_id merges shapes and a rectangle covers the pixels counted by hand."""

import base64
import json
import logging

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from segany.data import FolderDataModule, SA1BDataModule
from segany.data.make_shards import main as make_shards
from segany.testing.data import jpeg, png

H, W, S = 32, 48, 48  # images fit the output size exactly: no resampling, masks compare pixel for pixel


def _image(path, seed):
    rgb = np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8)
    path.write_bytes(jpeg(rgb) if path.suffix == ".jpg" else png(rgb))


def _blob(seed, shape=(H, W)):
    """A random object: a filled ellipse, at least a few pixels."""
    rng = np.random.default_rng(seed)
    m = np.zeros(shape, np.uint8)
    c = (int(rng.integers(8, shape[1] - 8)), int(rng.integers(8, shape[0] - 8)))
    cv2.ellipse(m, c, (int(rng.integers(3, 8)), int(rng.integers(3, 8))), 0, 0, 360, 1, -1)
    return m.astype(bool)


def _write_mask(path, mask):
    assert cv2.imwrite(str(path), mask.astype(np.uint8) * 255)


def _batches(fmt, images=None, annotations=None, **kw):
    kw = {"batch_size": 8, "num_workers": 0, "img_size": S, "max_area_frac": 1.0, **kw}
    dm = FolderDataModule(format=fmt, val_images=images and str(images), val_annotations=str(annotations), **kw)
    dm.setup("validate")
    return list(dm.val_dataloader())


def _masks_of(batch):
    """image id -> {mask id: (H, W) bool} of a batch (padding cut off)."""
    out = {}
    for b, key in enumerate(batch["image_id"]):
        rows = [r for r in range(batch["masks"].shape[1]) if batch["valid"][b, r]]
        out[key] = {int(batch["mask_ids"][b, r]): batch["masks"][b, r, :H, :W].numpy() for r in rows}
        for r in rows:  # nothing outside the image
            assert not batch["masks"][b, r, H:].any() and not batch["masks"][b, r, :, W:].any()
    return out


def _same_as_shards(batches, shards_dir, capsys, **kw):
    """SA1BDataModule on the written shards gives the folder datamodule's batches, key for key."""
    kw = {"batch_size": 8, "num_workers": 0, "img_size": S, "max_area_frac": 1.0, **kw}
    dm = SA1BDataModule(val_shards=str(shards_dir), **kw)
    dm.setup("validate")
    (from_shards,) = list(dm.val_dataloader())
    (from_folder,) = batches
    assert from_shards.keys() == from_folder.keys()
    for key, value in from_folder.items():
        if key != "faults":
            assert torch.equal(value, from_shards[key]) if torch.is_tensor(value) else value == from_shards[key], key


# -- binary PNGs, one per object ---------------------------------------------------------------


@pytest.fixture()
def binary_dir(tmp_path):
    (tmp_path / "images").mkdir()
    masks = tmp_path / "masks"
    masks.mkdir()
    truth = {}
    _image(tmp_path / "images" / "a.jpg", 0)  # layout <stem>_<k>.png
    truth["a"] = {0: _blob(1), 7: _blob(2)}
    for k, m in truth["a"].items():
        _write_mask(masks / f"a_{k}.png", m)
    _image(tmp_path / "images" / "img_2.png", 1)  # layout <stem>/<k>.png; a stem ending in _<digits>
    (masks / "img_2").mkdir()
    truth["img_2"] = {1: _blob(3), 3: _blob(4), 12: _blob(5)}
    for k, m in truth["img_2"].items():
        _write_mask(masks / "img_2" / f"{k}.png", m)
    _image(tmp_path / "images" / "c.jpg", 2)  # no mask: left out
    return tmp_path, truth


def test_binary_pngs_read_back_and_convert(binary_dir, capsys):
    root, truth = binary_dir
    batches = _batches("binary_pngs", root / "images", root / "masks")
    (batch,) = batches
    assert batch["image_id"] == ["a", "img_2"] and batch["faults"] == {}
    got = _masks_of(batch)
    assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in truth.items()}
    for key, objs in truth.items():
        for k, m in objs.items():
            assert (got[key][k] == m).all(), (key, k)
    out = root / "shards"
    make_shards(["binary_pngs", str(out), "--images", str(root / "images"), "--annotations", str(root / "masks")])
    assert "wrote 2 images to 1 shards" in capsys.readouterr().out
    _same_as_shards(batches, out, capsys)


def test_binary_pngs_bad_files_are_skipped_counted_and_named(binary_dir, caplog, capsys):
    root, truth = binary_dir
    (root / "masks" / "a_7.png").write_bytes(b"not a png")  # a's other object stays
    _write_mask(root / "masks" / "img_2" / "3.png", np.ones((H + 1, W), bool))  # another size than its image
    _image(root / "images" / "d.jpg", 3)
    (root / "masks" / "d_1.png").write_bytes(png(np.zeros((2, 2, 3), np.uint8))[:20])  # d's only mask: truncated
    with caplog.at_level(logging.WARNING, logger="segany.data"):
        (batch,) = _batches("binary_pngs", root / "images", root / "masks")
    assert batch["image_id"] == ["a", "img_2"] and batch["faults"] == {"bad_annotation": 3}
    got = _masks_of(batch)
    assert sorted(got["a"]) == [0] and sorted(got["img_2"]) == [1, 12]
    assert (got["img_2"][12] == truth["img_2"][12]).all()
    for name in ("a_7.png", "3.png", "d_1.png"):
        assert any(name in r.getMessage() for r in caplog.records), name
    assert any("33x48, its image 32x48" in r.getMessage() for r in caplog.records)
    args = ["binary_pngs", str(root / "s"), "--images", str(root / "images"), "--annotations", str(root / "masks")]
    make_shards(args)
    out = capsys.readouterr().out
    assert "wrote 2 images to 1 shards in" in out and "skipped: 3 bad_annotation" in out


def test_training_stream_and_split_list(binary_dir):
    root, _ = binary_dir
    (root / "train.txt").write_text("img_2\n")
    dm = FolderDataModule(
        format="binary_pngs",
        train_images=str(root / "images"),
        train_annotations=str(root / "masks"),
        train_list=str(root / "train.txt"),
        batch_size=1,
        num_workers=0,
        img_size=S,
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 1 and [b["image_id"] for b in loader] == [["img_2"]]
    (root / "train.txt").write_text("img_2\nnope\n")
    with pytest.raises(FileNotFoundError, match=r"train\.txt: 1 listed images not in .*\['nope'\]"):
        FolderDataModule(
            format="binary_pngs",
            train_images=str(root / "images"),
            train_annotations=str(root / "masks"),
            train_list=str(root / "train.txt"),
        ).setup("fit")


# -- instance-id PNGs --------------------------------------------------------------------------


@pytest.fixture()
def instance_dir(tmp_path):
    (tmp_path / "images").mkdir()
    masks = tmp_path / "masks"
    masks.mkdir()
    truth = {}
    _image(tmp_path / "images" / "a.jpg", 0)  # 16-bit ids, 255 = ignore
    label = np.zeros((H, W), np.uint16)
    label[2:10, 3:20] = 3
    label[15:30, 25:40] = 700
    label[12, :] = 255
    assert cv2.imwrite(str(masks / "a.png"), label)
    truth["a"] = {3: label == 3, 700: label == 700, 0: label == 255}
    _image(tmp_path / "images" / "b.png", 1)  # palette PNG: the indices are the ids, not the colours
    idx = np.zeros((H, W), np.uint8)
    idx[:, :10] = 1
    idx[20:, 30:] = 2
    im = Image.fromarray(idx, mode="P")
    im.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * 759)
    im.save(masks / "b.png")
    truth["b"] = {1: idx == 1, 2: idx == 2}
    return tmp_path, truth


def test_instance_pngs_read_back_and_convert(instance_dir, capsys):
    root, truth = instance_dir
    batches = _batches("instance_pngs", root / "images", root / "masks", ignore_value=255, include_crowd=True)
    (batch,) = batches
    assert batch["image_id"] == ["a", "b"] and batch["faults"] == {}
    got = _masks_of(batch)
    assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in truth.items()}
    for key, objs in truth.items():
        for k, m in objs.items():
            assert (got[key][k] == m).all(), (key, k)
    (no_crowd,) = _batches("instance_pngs", root / "images", root / "masks", ignore_value=255)
    assert sorted(_masks_of(no_crowd)["a"]) == [3, 700]  # the ignore region is no object
    out = root / "shards"
    args = ["instance_pngs", str(out), "--images", str(root / "images"), "--annotations", str(root / "masks")]
    make_shards([*args, "--ignore-value", "255"])
    assert "wrote 2 images to 1 shards" in capsys.readouterr().out
    _same_as_shards(batches, out, capsys, include_crowd=True)


def test_instance_pngs_bad_files_are_skipped_counted_and_named(instance_dir, caplog, capsys):
    root, _ = instance_dir
    (root / "masks" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    _image(root / "images" / "c.jpg", 2)
    assert cv2.imwrite(str(root / "masks" / "c.png"), np.ones((H, W + 2), np.uint8))  # another size
    _image(root / "images" / "d.jpg", 3)
    (root / "images" / "d.jpg").write_bytes(b"")  # the image itself is unreadable
    assert cv2.imwrite(str(root / "masks" / "d.png"), np.ones((H, W), np.uint8))
    with caplog.at_level(logging.WARNING, logger="segany.data"):
        (batch,) = _batches("instance_pngs", root / "images", root / "masks", ignore_value=255)
    assert batch["image_id"] == ["a"] and batch["faults"] == {"bad_annotation": 2, "bad_image": 1}
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "b.png" in text and "c.png is 32x50, its image 32x48" in text and "d.jpg" in text
    args = ["instance_pngs", str(root / "s"), "--images", str(root / "images"), "--annotations", str(root / "masks")]
    make_shards(args)
    assert "wrote 1 images to 1 shards" in capsys.readouterr().out


# -- labelme -------------------------------------------------------------------------------------


def _shape(label, points, shape_type="polygon", group_id=None):
    return {"label": label, "points": points, "group_id": group_id, "shape_type": shape_type, "flags": {}}


def _labelme(path, shapes, image_name=None, image_bytes=None):
    data = {"version": "5.4.1", "flags": {}, "shapes": shapes, "imageHeight": H, "imageWidth": W}
    data["imagePath"] = image_name or path.stem + ".jpg"
    data["imageData"] = base64.b64encode(image_bytes).decode() if image_bytes is not None else None
    path.write_text(json.dumps(data))


def _box(y0, y1, x0, x1):
    m = np.zeros((H, W), bool)
    m[y0 : y1 + 1, x0 : x1 + 1] = True
    return m


@pytest.fixture()
def labelme_dir(tmp_path):
    d = tmp_path / "labelme"
    d.mkdir()
    _image(d / "a.jpg", 0)  # the image next to its json (imagePath)
    _labelme(
        d / "a.json",
        [
            _shape("car", [[10, 8], [2, 3]], "rectangle"),  # corners in either order; both corner pixels in
            _shape("tree", [[20, 2], [25, 2], [25, 6], [20, 6]], group_id=1),  # two parts of one tree
            _shape("road", [[0, 20], [47, 20]], "line"),  # no area: passed over
            _shape("tree", [[30, 10], [34, 10], [34, 14], [30, 14]], group_id=1),
            _shape("tree", [[40, 25], [44, 25], [44, 29], [40, 29]], group_id=2),  # another tree
            _shape("car", [[5, 25], [9, 25], [9, 29], [5, 29]]),  # no group_id: an object by itself
        ],
    )
    rgb = np.random.default_rng(5).integers(0, 255, (H, W, 3), dtype=np.uint8)
    _labelme(d / "b.json", [_shape("cell", [[12, 12], [12, 16]], "circle")], "gone/b.png", png(rgb))  # imageData
    truth = {
        "a": {
            1: _box(3, 8, 2, 10),
            2: _box(2, 6, 20, 25) | _box(10, 14, 30, 34),
            3: _box(25, 29, 40, 44),
            4: _box(25, 29, 5, 9),
        },
        "b": {1: (np.arange(W)[None] - 12) ** 2 + (np.arange(H)[:, None] - 12) ** 2 <= 4**2},  # radius 4
    }
    return d, truth


def test_labelme_rectangle_group_id_and_conversion(labelme_dir, capsys):
    d, truth = labelme_dir
    batches = _batches("labelme", annotations=d)
    (batch,) = batches
    assert batch["image_id"] == ["a", "b"] and batch["faults"] == {}
    got = _masks_of(batch)
    assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in truth.items()}
    assert got["a"][1].sum() == 6 * 9  # rows 3..8, columns 2..10
    for key, objs in truth.items():
        for k, m in objs.items():
            assert (got[key][k] == m).all(), (key, k)
    out = d.parent / "shards"
    make_shards(["labelme", str(out), "--annotations", str(d)])
    assert "wrote 2 images to 1 shards" in capsys.readouterr().out
    _same_as_shards(batches, out, capsys)
    import tarfile

    with tarfile.open(out / "sa-000000.tar") as tar:
        meta = json.load(tar.extractfile("a.json"))
        assert [a["label"] for a in meta["annotations"]] == ["car", "tree", "tree", "car"]
        assert "b.png" in tar.getnames()  # imageData's PNG stored as it is


def test_labelme_bad_files_are_skipped_counted_and_named(labelme_dir, caplog):
    d, truth = labelme_dir
    (d / "c.json").write_text('{"shapes": [')  # does not parse
    (d / "e.json").write_text(json.dumps({"imagePath": "a.jpg"}))  # no shapes: not a labelme file
    _labelme(d / "f.json", [_shape("x", [[1, 1], [5, 5]], "rectangle")], "missing.jpg")  # no image
    _labelme(d / "g.json", [_shape("x", [[1, 1], [5, 5]])], "a.jpg")  # its only polygon has 2 points
    _labelme(d / "i.json", [_shape("x", [[1, 1], [5, 5]], "line")], "a.jpg")  # no area shape: no object
    data = json.loads((d / "a.json").read_text())
    data["imageHeight"] = H + 1  # another size than its image
    (d / "h.json").write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="segany.data"):
        (batch,) = _batches("labelme", annotations=d)
    assert batch["image_id"] == ["a", "b"]
    assert batch["faults"] == {"bad_json": 2, "bad_image": 2, "bad_annotation": 1, "no_annotations": 1}
    text = "\n".join(r.getMessage() for r in caplog.records)
    for name in ("c.json", "e.json", "f.json", "g.json", "h.json", "i.json", "missing.jpg", "imageHeight is 33"):
        assert name in text, name


@pytest.mark.parametrize("name", ["binary_pngs", "instance_pngs", "labelme"])
def test_configs_build_the_datamodule(name, binary_dir, labelme_dir):
    """configs/data/<name>.yaml: composes, each key a FolderDataModule argument, reads its folders."""
    from helpers import compose
    from hydra.utils import instantiate

    root, _ = binary_dir
    d, _ = labelme_dir
    paths = {"labelme": [f"data.val_annotations={d}"]}.get(
        name, [f"data.val_images={root / 'images'}", f"data.val_annotations={root / 'masks'}"]
    )
    cfg = compose(f"data={name}", *paths, "data.num_workers=0", "data.img_size=48", name="evaluate")
    dm = instantiate(cfg.data)
    assert isinstance(dm, FolderDataModule) and dm.format == name
    if name != "instance_pngs":  # the binary masks' folder holds no instance PNG of an image's stem
        dm.setup("validate")
        assert dm.val_dataset.num_images() == 2
