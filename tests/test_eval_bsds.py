"""The BSDS500 boundary benchmark (segany/evaluation/bsds.py) against the MATLAB benchmark's
published reference results, and the BSDS500 folder source (bsds_data.py) on fixtures and, opt-in,
on the real BSDS500 train split.

Reference: BSR/bench/data (BSDS500 release, Arbelaez et al. 2011), test_bench.m part 2,
``boundaryBench(imgDir, gtDir, pbDir, outDir, nthresh=5)`` on the 5 sample images 2018, 3063,
5096, 6046, 8068; its outputs test_2/eval_bdry_thr.txt, eval_bdry_img.txt and eval_bdry.txt are
transcribed below as the release prints them (%10g). The same files ship with pyEdgeEval's tests
(github.com/haruishi43/py-edge-eval, data/BSDS500_bench).
"""

import json
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy.io import savemat

from segany.evaluation.bsds import image_counts, max_f, summarize, thresholds
from segany.evaluation.bsds_data import BSDS500, load_bsds_ground_truth

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

# test_2/eval_bdry_thr.txt: threshold, R, P, F over the 5 images
REF_THR = np.array(
    [
        [0.166667, 0.60236, 0.848723, 0.704628],
        [0.333333, 0.443249, 0.926853, 0.599702],
        [0.5, 0.383339, 0.967137, 0.549053],
        [0.666667, 0.380404, 0.986264, 0.549042],
        [0.833333, 0.274124, 0.996101, 0.429932],
    ]
)
# test_2/eval_bdry_img.txt: image index, and its maxF (interpolated) threshold, R, P, F
REF_IMG = np.array(
    [
        [1, 0.166667, 0.6459, 0.887464, 0.747654],
        [2, 0.666667, 0.596991, 1.0, 0.747645],
        [3, 0.166667, 0.471811, 0.994419, 0.639978],
        [4, 0.166667, 0.477429, 0.939163, 0.633046],
        [5, 0.166667, 0.87032, 0.810371, 0.839276],
    ]
)
# test_2/eval_bdry.txt: ODS threshold, R, P, F; OIS R, P, F; Area_PR (AP)
REF_ALL = [0.166667, 0.60236, 0.848723, 0.704628, 0.580822, 0.908779, 0.708698, 0.307627]
SAMPLE = ["2018", "3063", "5096", "6046", "8068"]


def test_summary_reproduces_the_published_ods_and_ap_from_the_published_curve():
    # counts giving the published R, P at each threshold (one image: 10^7 GT and predicted pixels)
    n = 10**7
    counts = np.zeros((1, 5, 4), np.int64)
    counts[0, :, 0], counts[0, :, 1] = np.rint(REF_THR[:, 1] * n), n
    counts[0, :, 2], counts[0, :, 3] = np.rint(REF_THR[:, 2] * n), n
    s = summarize(counts, thresholds(5))
    assert np.allclose(thresholds(5), REF_THR[:, 0], atol=1e-6)
    got = [s["ODS_threshold"], s["ODS_recall"], s["ODS_precision"], s["ODS"], s["AP"]]
    assert got == pytest.approx(REF_ALL[:4] + [REF_ALL[7]], abs=2e-6)  # the printed digits
    assert np.allclose(s["curve"]["recall"], REF_THR[:, 1]) and np.allclose(s["curve"]["precision"], REF_THR[:, 2])


def _bench_dir():
    d = os.environ.get("SEGANY_BSDS_BENCH") or str(SHARED / "BSDS500_bench")
    need = [f"{d}/png/{i}.png" for i in SAMPLE] + [f"{d}/groundTruth/{i}.mat" for i in SAMPLE]
    if not all(os.path.isfile(f) for f in need):
        pytest.skip(
            f"the BSDS benchmark's sample (png/<id>.png, groundTruth/<id>.mat for {', '.join(SAMPLE)}; "
            "BSR/bench/data, or pyEdgeEval's data/BSDS500_bench) is not in SEGANY_BSDS_BENCH or "
            f"{SHARED / 'BSDS500_bench'}"
        )
    return d


@pytest.mark.slow  # 5 images x 5 thresholds x 5-6 annotators of correspondPixels: ~40 s
def test_sample_agrees_with_the_matlab_benchmark():
    d = _bench_dir()
    thr = thresholds(5)
    counts = []
    for i in SAMPLE:
        E = cv2.imread(f"{d}/png/{i}.png", cv2.IMREAD_UNCHANGED)
        assert E is not None and E.dtype == np.uint8, i
        counts.append(image_counts(E.astype(np.float64) / 255, load_bsds_ground_truth(f"{d}/groundTruth/{i}.mat"), thr))
    counts = np.stack(counts)  # (5, 5, 4)
    s = summarize(counts, thr)
    r, p = np.array(s["curve"]["recall"]), np.array(s["curve"]["precision"])
    f = 2 * p * r / (p + r)
    # every threshold: R, P, F within 0.005 of MATLAB (correspondPixels is randomised: ~5e-4 seen)
    assert np.abs(r - REF_THR[:, 1]).max() < 0.005
    assert np.abs(p - REF_THR[:, 2]).max() < 0.005
    assert np.abs(f - REF_THR[:, 3]).max() < 0.005
    ours = [s["ODS_threshold"], s["ODS_recall"], s["ODS_precision"], s["ODS"]]
    ours += [s["OIS_recall"], s["OIS_precision"], s["OIS"], s["AP"]]
    assert ours == pytest.approx(REF_ALL, abs=0.005)
    for k in range(5):  # each image's interpolated best (maxF)
        c = counts[k].astype(np.float64)
        t, ri, pi, fi = max_f(thr, c[:, 0] / c[:, 1], c[:, 2] / np.maximum(c[:, 3], 1))
        assert [ri, pi, fi] == pytest.approx(REF_IMG[k, 2:], abs=0.005), SAMPLE[k]


# --- the BSDS500 folder source -------------------------------------------------------------------


def _write_gt(path, boundaries):
    """A BSDS groundTruth .mat: a 1xN cell of structs {Segmentation, Boundaries}."""
    cell = np.empty((1, len(boundaries)), object)
    for i, b in enumerate(boundaries):
        cell[0, i] = {"Segmentation": np.ones(b.shape, np.uint16), "Boundaries": b.astype(np.uint8)}
    savemat(str(path), {"groundTruth": cell})


def _fake_bsds(root, ids=("12", "7", "30"), split="test", size=(40, 60)):
    img_dir, gt_dir = Path(root, "images", split), Path(root, "groundTruth", split)
    img_dir.mkdir(parents=True)
    gt_dir.mkdir(parents=True)
    for k, i in enumerate(ids):
        cv2.imwrite(str(img_dir / f"{i}.jpg"), np.full((*size, 3), 40 * k, np.uint8))
        b = np.zeros(size, bool)
        b[10 + k, 5:50] = True
        _write_gt(gt_dir / f"{i}.mat", [b, np.roll(b, 1, 0)])  # two annotators
    (img_dir / "Thumbs.db").write_bytes(b"\0")  # as in the release
    return root


def test_folder_source_reads_every_annotator_round_robin(tmp_path):
    ds = BSDS500(str(_fake_bsds(tmp_path)), split="test")
    ds.prepare_data()
    ds.setup("validate")
    assert ds.ids == ["12", "30", "7"]  # sorted ids of the groundTruth folder
    ims = list(ds.eval_images(0, 1))
    assert [e.key for e in ims] == ["12", "30", "7"] and ims[0].image.shape == (40, 60, 3) and ims[0].anns == []
    assert len(ims[0].boundaries) == 2 and ims[0].boundaries[0].dtype == bool
    assert ims[0].boundaries[0][10, 5:50].all() and ims[0].boundaries[1][11, 5:50].all()  # annotator order kept
    assert [e.key for e in ds.eval_images(1, 2)] == ["30"]  # rank 1 of 2: every second id from the second
    assert [e.key for e in ds.eval_images(0, 2, max_images=2)] == ["12"]  # ceil(2 / 2) each


def test_folder_source_errors_name_the_file(tmp_path):
    root = _fake_bsds(tmp_path)
    with pytest.raises(FileNotFoundError, match="images/val"):
        BSDS500(str(root), split="val").setup()
    os.remove(root / "images" / "test" / "7.jpg")
    with pytest.raises(FileNotFoundError, match=r"1 ground-truth file\(s\) without .*images/test/<id>.jpg, e.g. 7"):
        BSDS500(str(root), split="test").setup()
    bad = tmp_path / "bad.mat"
    savemat(str(bad), {"seg": np.zeros((3, 3))})
    with pytest.raises(ValueError, match="bad.mat: not a BSDS groundTruth"):
        load_bsds_ground_truth(str(bad))
    with pytest.raises(ValueError, match="task=edges only"):
        BSDS500(str(root)).val_dataloader()


# --- opt-in: the real BSDS500 train split ---------------------------------------------------------

BSDS_TRAIN = SHARED / "bsds500_train"


def _bsds_train():
    if not (BSDS_TRAIN / "groundTruth").is_dir():
        pytest.skip(f"real BSDS500 train split not present ({BSDS_TRAIN}: images/*.jpg, groundTruth/*.mat)")
    return str(BSDS_TRAIN)


def test_real_bsds500_annotator_against_itself_and_the_others():
    ds = BSDS500(_bsds_train(), split=None)
    ds.setup()
    assert len(ds.ids) == 200
    (ev,) = ds.eval_images(0, 1, max_images=1)
    assert ev.key == "100075" and ev.image.shape[:2] == ev.boundaries[0].shape and 5 <= len(ev.boundaries) <= 8
    first, others = ev.boundaries[0], ev.boundaries[1:]
    thr = np.array([0.5])
    ((cr, sr, cp, sp),) = image_counts(first.astype(np.float64), [first], thr)
    # one annotator against itself: the human maps are already thin (a few junction pixels thinned),
    # every predicted pixel has its own GT pixel at distance 0
    assert sr == first.sum() and sp >= 0.99 * sr and cp / sp == pytest.approx(1.0, abs=0.01) and cr >= 0.98 * sr
    # against the other annotators: humans agree with each other well above chance and below 1
    # (BSDS500 reports human F = 0.80 on test); a wide band, the exact value depends on the image
    ((cr, sr, cp, sp),) = image_counts(first.astype(np.float64), others, thr)
    f = 2 * (cr / sr) * (cp / sp) / (cr / sr + cp / sp)
    assert 0.5 < f < 0.98


def test_evaluate_reads_a_bsds500_folder(tmp_path):
    root = _bsds_train()
    from helpers import compose

    sys.path.insert(0, str(ROOT))
    import evaluate as evaluate_script

    out = tmp_path / "out"
    cfg = compose(
        "task=edges",
        "data=bsds500",
        f"data.root={root}",
        "data.split=null",
        "max_images=1",
        "edges.points_per_side=4",
        "edges.n_thresholds=3",
        f"output_dir={out}",
        f"paths.root_dir={tmp_path}",
        name="evaluate",
    )
    m = evaluate_script.evaluate(cfg)
    sec = json.loads((out / "metrics.json").read_text())["edges"]["datasets"]["bsds500"]
    assert sec == json.loads(json.dumps(m["edges"]["datasets"]["bsds500"]))
    assert sec["num_images"] == 1 and 0 <= sec["ODS"] <= 1 and len(sec["curve"]["recall"]) == 3
    assert "| bsds500 |" in (out / "results.md").read_text()
