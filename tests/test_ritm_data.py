"""The RITM-layout benchmark source (segany.data.RitmDataModule, configs/data/{grabcut,berkeley,davis,
sbd,pascalvoc,coco_mval}.yaml) on folders the test writes: GrabCut's 128 ignore band, VOC's palette
instances with their 220 border, SBD's .mat instances, list files, and task=noc end to end."""

import pickle
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import compose
from hydra.utils import instantiate
from PIL import Image
from scipy.io import savemat

from segany.data.decode import decode_mask
from segany.evaluation.sources import eval_images

ROOT = Path(__file__).resolve().parents[1]


def _dm(name, root, **over):
    cfg = compose(f"data={name}", f"data.root={root}", "data.num_workers=0", "data.img_size=64", name="evaluate")
    dm = instantiate(cfg.data, **over)
    dm.setup("validate")
    return dm


def _image(path, h, w, seed=0):
    img = np.random.default_rng(seed).integers(0, 255, (h, w, 3), np.uint8)
    assert cv2.imwrite(str(path), img)


def _grabcut(root):
    (root / "data_GT").mkdir(parents=True)
    (root / "boundary_GT").mkdir()
    masks = {}
    for i, (name, mask_ext) in enumerate((("a.jpg", ".bmp"), ("b.bmp", ".png"))):
        _image(root / "data_GT" / name, 30, 40, i)
        m = np.zeros((30, 40), np.uint8)
        m[5 : 20 + i, 8:30] = 255
        band = (cv2.dilate(m, np.ones((3, 3), np.uint8)) > 0) & ~(cv2.erode(m, np.ones((3, 3), np.uint8)) > 0)
        m[band] = 128
        assert cv2.imwrite(str(root / "boundary_GT" / (name.split(".")[0] + mask_ext)), m)
        masks[name.split(".")[0]] = m
    return masks


def test_grabcut_object_and_ignore_band(tmp_path):
    masks = _grabcut(tmp_path / "GrabCut")
    dm = _dm("grabcut", tmp_path / "GrabCut")
    evs = list(eval_images(dm))
    assert [e.key for e in evs] == ["a", "b"] and all(e.size == (30, 40) for e in evs)
    for ev in evs:
        m = masks[ev.key]
        obj, band = [a for a in ev.anns if not a["iscrowd"]], [a for a in ev.anns if a["iscrowd"]]
        assert len(obj) == 1 and len(band) == 1 and band[0]["id"] == 0
        assert (decode_mask(obj[0]["segmentation"]) == (m > 128)).all()
        assert (decode_mask(band[0]["segmentation"]) == (m == 128)).all()
    # the points task's batches: the object only (the band is a crowd region, left out)
    batch = next(iter(dm.val_dataloader()))
    assert batch["masks"].shape[:2] == (1, 1) and batch["mask_ids"].tolist() == [[1]]


VOC_PALETTE = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 255: (224, 224, 192)}


def _voc(root):
    for d in ("JPEGImages", "SegmentationObject", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    idx = np.zeros((24, 32), np.uint8)
    idx[2:10, 2:12] = 1
    idx[12:20, 15:30] = 2
    idx[10, 2:12] = 255  # VOC's border colour: ignored
    pal = np.zeros((256, 3), np.uint8)
    for k, c in VOC_PALETTE.items():
        pal[k] = c
    im = Image.fromarray(idx, mode="P")
    im.putpalette(pal.flatten().tolist())
    im.save(root / "SegmentationObject" / "2007_000032.png")
    _image(root / "JPEGImages" / "2007_000032.jpg", 24, 32)
    (root / "ImageSets/Segmentation/val.txt").write_text("2007_000032\n")
    return idx


def test_pascalvoc_instances_split_by_value_with_the_220_border(tmp_path):
    idx = _voc(tmp_path / "PascalVOC")
    (ev,) = eval_images(_dm("pascalvoc", tmp_path / "PascalVOC"))
    objs = {a["id"]: decode_mask(a["segmentation"]) for a in ev.anns if not a["iscrowd"]}
    # grey levels of the palette colours (cv2 BGR2GRAY, as RITM reads them): 38 and 75
    assert sorted(objs) == [38, 75]
    assert (objs[38] == (idx == 1)).all() and (objs[75] == (idx == 2)).all()
    (band,) = [decode_mask(a["segmentation"]) for a in ev.anns if a["iscrowd"]]
    assert (band == (idx == 255)).all()


def test_list_pickle_selects_instances_and_runs_no_code(tmp_path):
    root = tmp_path / "PascalVOC"
    _voc(root)
    with open(root / "ImageSets/Segmentation/test.pickle", "wb") as f:
        pickle.dump((["2007_000032"], [np.int64(75)]), f)  # RITM's (names, instance ids)
    dm = _dm("pascalvoc", root, list_file="ImageSets/Segmentation/test.pickle")
    (ev,) = eval_images(dm)
    assert [a["id"] for a in ev.anns if not a["iscrowd"]] == [75]

    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('ran')",))

    with open(root / "evil.pickle", "wb") as f:
        pickle.dump((["2007_000032"], [Evil()]), f)
    with pytest.raises(ValueError, match="evil.pickle.*not allowed"):
        _dm("pascalvoc", root, list_file="evil.pickle")


def test_sbd_mat_instances_and_missing_masks(tmp_path):
    root = tmp_path / "SBD"
    (root / "img").mkdir(parents=True)
    (root / "inst").mkdir()
    seg = np.zeros((20, 25), np.uint8)
    seg[1:5, 1:5], seg[8:18, 3:20] = 1, 3
    savemat(root / "inst" / "2008_000002.mat", {"GTinst": {"Segmentation": seg, "Boundaries": [], "Categories": [1]}})
    _image(root / "img" / "2008_000002.jpg", 20, 25)
    _image(root / "img" / "2008_000003.jpg", 20, 25)  # not listed: never read
    (root / "val.txt").write_text("2008_000002\n")
    (ev,) = eval_images(_dm("sbd", root))
    assert [a["id"] for a in ev.anns] == [1, 3] and not any(a["iscrowd"] for a in ev.anns)
    assert (decode_mask(ev.anns[1]["segmentation"]) == (seg == 3)).all()
    (root / "val.txt").write_text("2008_000002\n2008_000003\n")
    with pytest.raises(FileNotFoundError, match="2008_000003.jpg"):
        _dm("sbd", root)


def test_davis_any_positive_value_is_the_object_and_noc_runs(tmp_path):
    root = tmp_path / "DAVIS"
    (root / "img").mkdir(parents=True)
    (root / "gt").mkdir()
    _image(root / "img" / "000.jpg", 32, 48)
    m = np.zeros((32, 48), np.uint8)
    m[4:20, 6:30], m[22:28, 30:40] = 1, 2  # palette indices 1 and 2: one object
    im = Image.fromarray(m, mode="P")
    im.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0])  # DAVIS's palette PNGs: index 1 = (128, 0, 0)
    im.save(root / "gt" / "000.png")
    (ev,) = eval_images(_dm("davis", root))
    (obj,) = ev.anns
    assert (decode_mask(obj["segmentation"]) == (m > 0)).all()

    sys.path.insert(0, str(ROOT))
    import evaluate as evaluate_script

    out = tmp_path / "out"
    cfg = compose(
        "task=noc", "data=davis", f"data.root={root}", "noc.max_clicks=3", f"output_dir={out}", name="evaluate"
    )
    metrics = evaluate_script.evaluate(cfg)
    d = metrics["noc"]["datasets"]["ritm"]
    assert d["num_objects"] == 1 and d["num_images"] == 1
    assert set(d) >= {"NoC@85", "NoC@90", "NoF@90", "miou@1", "miou@3"} and 1 <= d["NoC@90"] <= 3
    assert (out / "noc_miou_vs_clicks.png").stat().st_size > 1000
    assert "| ritm |" in (out / "results.md").read_text()


@pytest.mark.parametrize(
    "name,folder,images,masks,fmt",
    [
        ("grabcut", "GrabCut", "data_GT", "boundary_GT", "grabcut"),
        ("berkeley", "Berkeley", "images", "masks", "grabcut"),
        ("davis", "DAVIS", "img", "gt", "binary"),
        ("coco_mval", "COCO_MVal", "img", "gt", "binary"),
        ("sbd", "SBD", "img", "inst", "sbd"),
        ("pascalvoc", "PascalVOC", "JPEGImages", "SegmentationObject", "instances"),
    ],
)
def test_named_configs(name, folder, images, masks, fmt):
    cfg = compose(f"data={name}", "paths.data_dir=/data", name="evaluate").data
    assert cfg._target_ == "segany.data.RitmDataModule" and cfg.root == f"/data/{folder}"
    assert (cfg.images_dir, cfg.masks_dir, cfg.mask_format) == (images, masks, fmt)
    dm = instantiate(cfg)
    assert dm.cfg.max_area_frac == 1.0 and not dm.cfg.include_crowd
    with pytest.raises(FileNotFoundError, match=f"data.root: folder /data/{folder} does not exist"):
        dm.setup("validate")
