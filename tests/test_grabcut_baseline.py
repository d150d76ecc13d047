"""The reference methods of the interactive tasks: GrabCut driven by RITM's clicker on hand-made
scenes (one click finds a distinct square, a negative click removes a wrongly included one, the
clicks' seeds always hold), the untrained twin of a checkpoint's architecture, and task=noc /
task=points writing the reference rows and curves; GrabCut on real DAVIS images (opt-in)."""

import json
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import compose
from hydra.utils import instantiate
from PIL import Image

from segany.evaluation import report
from segany.evaluation.clicks import Clicker
from segany.evaluation.grabcut import GrabCutSegmenter
from segany.evaluation.noc import NocTask, object_ious
from segany.modeling.checkpoint import load_model, untrained_like

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SEGANY_SHARED_DATA", ROOT.parent / "shared" / "data"))
DAVIS = SHARED / "DAVIS"


def _scene(squares, size=96, seed=0):
    """(size, size, 3) uint8 RGB: red squares (y, x, side) on a green-blue noise texture; their masks."""
    rng = np.random.default_rng(seed)
    img = np.stack([rng.integers(0, 60, (size, size)), rng.integers(90, 200, (size, size))], -1)
    img = np.concatenate([img, rng.integers(120, 255, (size, size, 1))], -1).astype(np.uint8)
    gts = []
    for y, x, s in squares:
        img[y : y + s, x : x + s] = np.clip((220, 30, 30) + rng.integers(-15, 15, (s, s, 3)), 0, 255)
        gt = np.zeros((size, size), bool)
        gt[y : y + s, x : x + s] = True
        gts.append(gt)
    return img, gts


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_one_click_at_the_centre_segments_a_distinct_square():
    img, (gt,) = _scene([(28, 28, 40)])
    seg = GrabCutSegmenter(radius=5, iterations=5, prior_radius=0)
    seg.set_image(img)
    ious = object_ious(seg, gt, np.zeros_like(gt), max_clicks=2)
    assert ious[0] > 0.97  # measured 1.0
    pred, _ = seg.predict([(48, 48, 1)])
    assert _iou(pred, gt) == pytest.approx(ious[0])
    small = GrabCutSegmenter(radius=2, prior_radius=0)  # a 13 px seed: GrabCut keeps little more than it
    small.set_image(img)
    assert _iou(small.predict([(48, 48, 1)])[0], gt) < 0.2  # measured 0.008
    small.prior_radius = 10  # a disk of probable foreground around it: the colours to fit
    assert _iou(small.predict([(48, 48, 1)])[0], gt) > 0.97  # measured 1.0


def test_a_negative_click_removes_a_wrongly_included_square():
    img, (gt, other) = _scene([(10, 10, 30), (56, 56, 30)])
    seg = GrabCutSegmenter()
    seg.set_image(img)
    ious = object_ious(seg, gt, np.zeros_like(gt), max_clicks=2)
    assert ious[0] == pytest.approx(0.5, abs=0.05)  # click 1: both red squares (measured 0.5)
    assert ious[1] > 0.97  # click 2, negative at the other square's centre (measured 1.0)
    first, _ = seg.predict([(25, 25, 1)])
    assert first[other].mean() > 0.9
    second, _ = seg.predict([(25, 25, 1), (71, 71, 0)], first)
    assert second[other].mean() < 0.05 and second[gt].mean() > 0.97


@pytest.mark.parametrize("init", ["previous", "none"])
def test_the_clicks_are_seeds_that_always_hold(init):
    img, (gt,) = _scene([(28, 28, 40)])
    seg = GrabCutSegmenter(radius=3, prior_radius=6, init=init)
    seg.set_image(img)
    # positive in the texture (GrabCut's colours say background), negative in the square, and a
    # negative 2 px from the positive centre click: its disk covers that click's pixel
    clicks = [(48, 48, 1), (8, 80, 1), (60, 40, 0), (48, 50, 0)]
    prev = gt.copy()
    pred, state = seg.predict(clicks, prev)
    assert pred is state and pred.dtype == bool and pred.shape == gt.shape
    for y, x, label in clicks:
        assert pred[y, x] == bool(label), (y, x, label)
    yy, xx = np.mgrid[:96, :96]
    disk = (yy - 8) ** 2 + (xx - 80) ** 2 <= 9  # the whole disk of the lone positive click
    assert pred[disk].all()
    gc = seg.labels(clicks, prev)
    assert gc[48, 48] == cv2.GC_FGD and gc[48, 49] == cv2.GC_BGD  # later disks over earlier, clicks last
    expect_rest = cv2.GC_PR_FGD if init == "previous" else cv2.GC_PR_BGD
    assert gc[30, 30] == expect_rest and gc[90, 5] == cv2.GC_PR_BGD
    assert gc[8, 85] == cv2.GC_PR_FGD and gc[60, 45] == expect_rest  # the prior: positive clicks only


def test_a_map_without_enough_background_is_returned_as_it_is():
    img, (gt,) = _scene([(28, 28, 40)])
    seg = GrabCutSegmenter(init="previous")
    seg.set_image(img)
    everything = np.ones_like(gt)
    pred, _ = seg.predict([(48, 48, 1)], everything)  # nothing background: cv2.grabCut would fail
    assert pred.all()
    with pytest.raises(ValueError, match="init"):
        GrabCutSegmenter(init="box")


def test_the_untrained_twin_has_the_checkpoints_architecture_and_the_baselines_seed(tmp_path):
    torch.manual_seed(3)
    trained = instantiate(compose("model=vit_tiny", "model.decoder_depth=1", name="evaluate").model)
    path = tmp_path / "last.ckpt"
    node = {"_target_": "segany.build_sam", "variant": "vit_tiny", "decoder_depth": 1}
    sd = {f"model.{k}": v for k, v in trained.state_dict().items()}
    torch.save({"state_dict": sd, "global_step": 1, "segany_config": {"model": node}}, path)
    model, _ = load_model(str(path), compose(name="evaluate").model)  # the config's decoder_depth is 2
    twin = untrained_like(model, seed=0)
    assert twin.config == model.config and len(twin.mask_decoder.transformer.layers) == 1
    baseline, what = load_model(None, compose("model.decoder_depth=1", name="evaluate").model, seed=0)
    assert what == "untrained"
    for (k, a), b, c in zip(twin.state_dict().items(), baseline.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b), k  # evaluate.py's untrained baseline of that architecture
    assert not all(torch.equal(a, c) for a, c in zip(twin.state_dict().values(), model.state_dict().values()))


def test_unknown_or_repeated_baselines_are_refused():
    for bad in ("[snake]", "[grabcut,grabcut]"):
        task = NocTask(compose(f"noc.baselines={bad}", name="evaluate"), None, "cpu", ".")
        with pytest.raises(ValueError, match="noc.baselines"):
            task._baselines()


def _ritm_set(root: Path):
    """A RITM-layout set of two scenes (img/*.png, gt/*.png, one object each)."""
    (root / "img").mkdir(parents=True)
    (root / "gt").mkdir()
    for i, squares in enumerate([[(28, 28, 40)], [(10, 10, 30), (56, 56, 30)]]):
        img, gts = _scene(squares, seed=i)
        Image.fromarray(img).save(root / "img" / f"{i:03d}.png")  # lossless: the colours as made
        Image.fromarray(gts[0].astype(np.uint8) * 255).save(root / "gt" / f"{i:03d}.png")


def test_noc_and_points_write_the_reference_rows_and_curves(tmp_path, monkeypatch):
    _ritm_set(tmp_path / "set")
    lines = {}  # figure file -> labels of its curves
    finish = report._finish

    def record(plt, fig, ax, out_dir, filename):
        lines[filename] = [ln.get_label() for ln in ax.get_lines()]
        return finish(plt, fig, ax, out_dir, filename)

    monkeypatch.setattr(report, "_finish", record)
    sys.path.insert(0, str(ROOT))
    import evaluate as evaluate_script

    out = tmp_path / "out"
    cfg = compose(
        "task=[points,noc]",
        "data=davis",
        f"data.root={tmp_path / 'set'}",
        "data.num_workers=0",
        "points.clicks=[1,2]",
        "points.baselines=[untrained]",
        "noc.max_clicks=3",
        "noc.baselines=[grabcut,untrained]",
        f"output_dir={out}",
        name="evaluate",
    )
    evaluate_script.evaluate(cfg)
    saved = json.loads((out / "metrics.json").read_text())
    noc = saved["noc"]
    model = noc["datasets"]["ritm"]
    grab = noc["references"]["grabcut"]["datasets"]["ritm"]
    assert grab["num_objects"] == model["num_objects"] == 2 and grab["num_images"] == 2
    assert grab["miou@1"] == pytest.approx((1.0 + 0.5) / 2, abs=0.05)  # as the hand-made cases above
    assert grab["miou@2"] > 0.95 and grab["NoC@90"] == pytest.approx(1.5)
    assert noc["references"]["grabcut"]["mean"]["NoC@90"] == grab["NoC@90"]
    assert "references" not in model and noc["settings"]["baselines"] == ["grabcut", "untrained"]
    # without a checkpoint the model is evaluate.py's untrained baseline: its twin answers the same
    assert noc["references"]["untrained"]["datasets"]["ritm"] == model
    pts = saved["points"]
    assert pts["references"]["untrained"]["datasets"]["ritm"] == pts["datasets"]["ritm"]
    assert pts["references"]["untrained"]["mean"] == pts["mean"] and "references" not in pts["datasets"]["ritm"]
    md = (out / "results.md").read_text()
    for row in ("| ritm (model) |", "| ritm (grabcut) |", "| ritm (untrained) |"):
        assert row in md
    assert lines["noc_miou_vs_clicks.png"] == ["ritm", "grabcut", "untrained"]
    assert lines["points_miou_vs_clicks.png"] == ["ritm", "oracle (mean)", "untrained"]
    assert (out / "noc_miou_vs_clicks.png").stat().st_size > 1000


@pytest.mark.skipif(not DAVIS.is_dir(), reason=f"real DAVIS-345 not found at {DAVIS}")
def test_grabcut_on_three_davis_images():
    seg, seeds_only, first, first_seeds_only = GrabCutSegmenter(), GrabCutSegmenter(prior_radius=0), [], []
    for name in sorted(os.listdir(DAVIS / "img"))[::115]:  # 3 of the 345
        img = cv2.imread(str(DAVIS / "img" / name))[..., ::-1]
        gt = cv2.imread(str(DAVIS / "gt" / f"{Path(name).stem}.png")).max(2) > 0
        seg.set_image(img)
        seeds_only.set_image(img)
        clicker, pred = Clicker(gt), None
        for k in range(4):
            clicker.click(pred)
            pred, _ = seg.predict(clicker.clicks, pred)
            assert all(pred[y, x] == bool(label) for y, x, label in clicker.clicks), (name, k)
            if k == 0:
                first.append(_iou(pred, gt))
                first_seeds_only.append(_iou(seeds_only.predict(clicker.clicks)[0], gt))
    assert np.mean(first) > 0.3  # measured 0.446 (0.494, 0.841, 0.003)
    assert np.mean(first_seeds_only) < 0.05  # measured 0.005: the prior disk is what click 1 needs
