"""The annotation server's API (segany.annotate): clicks decode to the masks the official
SamPredictor gives, accept / undo / delete / brush change the stored shard as stated, the
shards read back through SA1BDataModule, a SIGKILLed server leaves readable shards, and bad
requests (path traversal, oversized bodies, malformed fields, no token) get a 4xx with
nothing written."""

import json
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from segany.annotate import create_app  # noqa: E402
from segany.data import SA1BDataModule  # noqa: E402

try:
    from _official import build_blob_sam, make_test_image
except ImportError:  # tests/ imported as a package
    from tests._official import build_blob_sam, make_test_image

ROOT = Path(__file__).resolve().parents[1]
H, W = 200, 300


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The blob model (localised masks around each click) as a release-style .pth."""
    path = tmp_path_factory.mktemp("ckpt") / "blob.pth"
    torch.save(build_blob_sam(seed=0).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    for k in range(3):
        cv2.imwrite(str(d / f"im{k}.png"), make_test_image(H, W, seed=k)[..., ::-1])
    return d


def _client(images, ckpt, out, **kw):
    return TestClient(create_app(str(images), str(ckpt), str(out), shard_size=2, **kw))


def _mask(runs, h=H, w=W):
    """The page's row-major runs (background first) -> (h, w) bool."""
    flat = np.zeros(h * w, bool)
    p = 0
    for j, r in enumerate(runs):
        flat[p : p + r] = j % 2 == 1
        p += r
    assert p == h * w
    return flat.reshape(h, w)


def _shard_json(path):
    with tarfile.open(path) as t:
        return {m.name: json.loads(t.extractfile(m).read()) for m in t.getmembers() if m.name.endswith(".json")}


def _decode(seg):
    return mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)


def _snapshot(d):
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(d).iterdir()}


def test_click_gives_the_official_predictors_masks(images, ckpt, tmp_path):
    from segment_anything import SamPredictor as OfficialPredictor

    c = _client(images, ckpt, tmp_path / "out")
    assert c.get("/api/images/1").json()["width"] == W
    r = c.post("/api/images/1/decode", json={"points": [[200, 70, 1]], "multimask": True})
    assert r.status_code == 200
    got = r.json()
    official = OfficialPredictor(build_blob_sam(seed=0))
    official.set_image(make_test_image(H, W, seed=1))
    masks, scores, _ = official.predict(np.array([[200.0, 70.0]]), np.array([1]), multimask_output=True)
    assert len(got["masks"]) == 3
    np.testing.assert_allclose(got["scores"], scores, atol=1e-4)
    for runs, ref in zip(got["masks"], masks):
        m = _mask(runs)
        assert (m != ref).mean() < 1e-3  # float round-off at the threshold
    # two clicks (one background): a single mask, as the official predictor with multimask off
    r = c.post("/api/images/1/decode", json={"points": [[200, 70, 1], [20, 20, 0]], "multimask": True})
    masks, _, _ = official.predict(np.array([[200.0, 70.0], [20.0, 20.0]]), np.array([1, 0]), multimask_output=False)
    assert len(r.json()["masks"]) == 1 and (_mask(r.json()["masks"][0]) != masks[0]).mean() < 1e-3


def test_accept_undo_delete_brush_change_the_shard(images, ckpt, tmp_path):
    out = tmp_path / "out"
    c = _client(images, ckpt, out, annotator="ann1")
    prompt = {"points": [[60, 70, 1]], "multimask": True}
    chosen = _mask(c.post("/api/images/0/decode", json=prompt).json()["masks"][2])
    a = c.post("/api/images/0/accept", json={**prompt, "choice": 2, "seconds": 4.25, "clicks": 1, "label": "car"})
    assert a.status_code == 200, a.text
    shard = out / "manual-000000.tar"  # images 0, 1 (shard_size 2)
    (ann,) = _shard_json(shard)["sa_0.json"]["annotations"]
    assert (_decode(ann["segmentation"]) == chosen).all() and ann["area"] == chosen.sum()
    assert ann["id"] == 0 and ann["point_coords"] == [[60.0, 70.0]]
    provenance = tuple(ann[k] for k in ("source", "annotator", "seconds", "clicks", "label"))
    assert provenance == ("manual", "ann1", 4.25, 1, "car")

    b = c.post("/api/images/0/accept", json={"points": [[200, 70, 1]], "choice": 0, "clicks": 2}).json()
    anns = _shard_json(shard)["sa_0.json"]["annotations"]
    assert [x["id"] for x in anns] == [0, b["id"]] == [0, 1]

    # brush: a disk of radius 5 at (280, 180), far from both masks; the eraser: the first mask's click point
    before = _decode(anns[1]["segmentation"])
    assert not before[175:186, 275:286].any()
    r = c.post("/api/images/0/masks/1/brush", json={"strokes": [{"x": 280, "y": 180, "r": 5}], "seconds": 1})
    assert r.status_code == 200
    after = _decode(_shard_json(shard)["sa_0.json"]["annotations"][1]["segmentation"])
    added = after & ~before
    assert not (before & ~after).any() and added[180, 280] and added[180, 275] and added[175, 280]
    assert added.sum() == 81  # the lattice points with x^2 + y^2 <= 25, by rows: 11 + 2 * (9 + 9 + 9 + 7 + 1)
    assert added[175:186, 275:286].sum() == added.sum()
    assert _shard_json(shard)["sa_0.json"]["annotations"][1]["seconds"] == 1.0
    r = c.post("/api/images/0/masks/0/brush", json={"strokes": [{"x": 60, "y": 70, "r": 0, "erase": True}]})
    assert r.status_code == 200
    erased = _decode(_shard_json(shard)["sa_0.json"]["annotations"][0]["segmentation"])
    assert not erased[70, 60] and (erased != chosen).sum() == 1

    assert c.post("/api/images/0/masks/0/delete").status_code == 200
    assert [x["id"] for x in _shard_json(shard)["sa_0.json"]["annotations"]] == [1]
    assert c.post("/api/images/0/masks/0/delete").status_code == 404

    # undo, newest first: the delete, the erase, the brush, the second accept, the first accept
    assert c.post("/api/images/0/undo").json() == {"masks": 2}
    assert (_decode(_shard_json(shard)["sa_0.json"]["annotations"][0]["segmentation"]) == erased).all()
    c.post("/api/images/0/undo")
    assert (_decode(_shard_json(shard)["sa_0.json"]["annotations"][0]["segmentation"]) == chosen).all()
    c.post("/api/images/0/undo")
    assert (_decode(_shard_json(shard)["sa_0.json"]["annotations"][1]["segmentation"]) == before).all()
    assert c.post("/api/images/0/undo").json() == {"masks": 1}
    assert c.post("/api/images/0/undo").json() == {"masks": 0}
    assert not shard.exists()  # no image left with a mask: no shard
    assert c.post("/api/images/0/undo").status_code == 409


def test_shards_read_back_through_the_datamodule_and_stats(images, ckpt, tmp_path):
    out = tmp_path / "out"
    c = _client(images, ckpt, out)
    for i, (x, y) in enumerate([(60, 70), (200, 70), (140, 100)]):
        assert c.post(f"/api/images/{i}/accept", json={"points": [[x, y, 1]], "choice": 1}).status_code == 200
    c.post("/api/images/2/accept", json={"box": [120, 20, 160, 180], "seconds": 2.0, "clicks": 1})
    assert sorted(p.name for p in out.glob("*.tar")) == ["manual-000000.tar", "manual-000001.tar"]
    listing = c.get("/api/images").json()
    assert listing["done"] == 3 and [r["masks"] for r in listing["images"]] == [1, 1, 2]
    stats = c.get("/api/stats").json()
    assert [x["masks"] for x in stats["images"]] == [1, 1, 2] and len(stats["masks"]) == 4
    assert c.get("/stats").status_code == 200

    dm = SA1BDataModule(val_shards=str(out), img_size=256, max_masks=8, batch_size=3, num_workers=0)
    dm.setup("validate")
    (batch,) = list(dm.val_dataloader())
    assert batch["image"].shape == (3, 3, 256, 256) and sum(batch["faults"].values()) == 0
    assert batch["valid"].sum(1).tolist() == [1, 1, 2]


def test_semi_mode_places_the_engine_masks_once(images, ckpt, tmp_path):
    from segany.engine import SemiAnnotator
    from segany.modeling.checkpoint import load_model

    settings = dict(points_per_side=4, pred_iou_thresh=0.5, stability_score_thresh=0.5, min_mask_region_area=0)
    out = tmp_path / "out"
    c = _client(images, ckpt, out, semi=True, semi_settings=settings)
    placed = c.get("/api/images/0").json()["masks"]
    model, _ = load_model(str(ckpt))
    expected = SemiAnnotator(model.eval(), **settings)(make_test_image(H, W, seed=0), 0, None)
    assert len(placed) == len(expected) > 0 and {m["source"] for m in placed} == {"semi"}
    stored = _shard_json(out / "manual-000000.tar")["sa_0.json"]["annotations"]
    assert [a["segmentation"] for a in stored] == [a["segmentation"] for a in expected]
    assert len(c.get("/api/images/0").json()["masks"]) == len(expected)
    c.post(f"/api/images/0/masks/{placed[0]['id']}/delete")
    c2 = _client(images, ckpt, out, semi=True, semi_settings=settings)  # a restart: not placed again
    assert len(c2.get("/api/images/0").json()["masks"]) == len(expected) - 1


def test_bad_requests_are_refused_and_write_nothing(images, ckpt, tmp_path):
    out = tmp_path / "out"
    c = _client(images, ckpt, out)
    assert c.post("/api/images/0/accept", json={"points": [[60, 70, 1]]}).status_code == 200
    snap = _snapshot(out)
    ok = {"points": [[60, 70, 1]]}
    for method, url, body in [
        ("get", "/static/../pyproject.toml", None),
        ("get", "/static/..%2F..%2Fpyproject.toml", None),
        ("get", "/api/images/..%2F..%2Fpyproject.toml/image", None),
        ("get", "/api/images/%2Fetc%2Fpasswd/image", None),
        ("get", "/api/images/3", None),
        ("get", "/api/images/-1/image", None),
        ("post", "/api/images/9/accept", ok),
        ("post", "/api/images/0/accept", {"points": [[60, 70, 2]]}),  # label not 0/1
        ("post", "/api/images/0/accept", {"points": [[300, 70, 1]]}),  # x == width
        ("post", "/api/images/0/accept", {"points": [[60, 70]]}),
        ("post", "/api/images/0/accept", {"points": []}),
        ("post", "/api/images/0/accept", {"box": [50, 50, 40, 60]}),
        ("post", "/api/images/0/accept", {**ok, "choice": 3}),
        ("post", "/api/images/0/accept", {"points": [[60, 70, 1]] * 65}),
        ("post", "/api/images/0/accept", {**ok, "label": "x" * 65}),
        ("post", "/api/images/0/accept", {**ok, "strokes": [{"x": 1, "y": 1, "r": -1}]}),
        ("post", "/api/images/0/accept", {**ok, "points": [[60, 70, 1]], "seconds": "soon"}),
        ("post", "/api/images/0/masks/0/brush", {"strokes": []}),
        ("post", "/api/images/0/masks/7/brush", {"strokes": [{"x": 1, "y": 1, "r": 1}]}),
        ("post", "/api/images/0/masks/0/brush", {"strokes": [{"x": 60, "y": 70, "r": 500, "erase": True}]}),
        ("post", "/api/images/0/masks/7/delete", None),
        ("post", "/api/images/1/undo", None),
    ]:
        r = getattr(c, method)(url) if body is None else c.post(url, json=body)
        assert 400 <= r.status_code < 500, (url, body, r.status_code, r.text)
    r = c.post("/api/images/0/accept", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    big = json.dumps({**ok, "strokes": [{"x": 1.0, "y": 1.0, "r": 1.0}] * 40_000})
    assert len(big) > 1 << 20
    r = c.post("/api/images/0/accept", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert _snapshot(out) == snap
    assert c.get("/api/images/0").json()["masks"][0]["id"] == 0


def test_token_is_required_when_set(images, ckpt, tmp_path):
    c = _client(images, ckpt, tmp_path / "out", token="s3cret")
    assert c.get("/api/info").status_code == 401
    assert c.get("/api/info", headers={"X-Token": "wrong"}).status_code == 401
    assert c.post("/api/images/0/accept", json={"points": [[60, 70, 1]]}).status_code == 401
    assert not list((tmp_path / "out").glob("*.tar"))
    assert c.get("/api/info", headers={"X-Token": "s3cret"}).status_code == 200
    assert c.get("/?token=s3cret").status_code == 200  # sets the cookie the page's requests carry
    assert c.get("/api/info").status_code == 200


def test_two_servers_on_one_output_keep_every_mask(images, ckpt, tmp_path):
    """Two apps (two servers / tabs) accepting at the same time on one shard: the lock makes each
    change a whole read-modify-write, so no mask is lost and the shard stays readable."""
    out = tmp_path / "out"
    clients = [_client(images, ckpt, out), _client(images, ckpt, out)]
    errors = []

    def work(c, image, x):
        for k in range(4):
            r = c.post(f"/api/images/{image}/accept", json={"points": [[x + 10 * k, 70, 1]]})
            if r.status_code != 200:
                errors.append(r.text)

    threads = [threading.Thread(target=work, args=(c, i, x)) for c, i, x in zip(clients, (0, 1), (40, 180))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    metas = _shard_json(out / "manual-000000.tar")
    assert [len(metas[k]["annotations"]) for k in ("sa_0.json", "sa_1.json")] == [4, 4]


def test_model_reload_uses_the_new_checkpoint(images, tmp_path):
    path = tmp_path / "model.pth"
    torch.save(build_blob_sam(seed=0).state_dict(), path)
    c = _client(images, path, tmp_path / "out")
    prompt = {"points": [[60, 70, 1]], "multimask": True}
    first = c.post("/api/images/0/decode", json=prompt).json()["scores"]
    torch.save(build_blob_sam(seed=3).state_dict(), path)  # a newer checkpoint under the same name
    assert c.post("/api/images/0/decode", json=prompt).json()["scores"] == first  # cached until reloaded
    assert c.post("/api/model/reload").status_code == 200
    assert c.post("/api/images/0/decode", json=prompt).json()["scores"] != first


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_killed_server_leaves_readable_shards_and_resumes(images, ckpt, tmp_path):
    import httpx

    out, port = tmp_path / "out", _free_port()
    cmd = [sys.executable, "-m", "segany.annotate", "--images", str(images), "--checkpoint", str(ckpt)]
    cmd += ["--out", str(out), "--port", str(port), "--shard-size", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        for line in proc.stdout:
            if line.startswith("open "):
                url = line.split()[1]
                break
        assert url == f"http://127.0.0.1:{port}/", url
        for _ in range(100):
            try:
                httpx.get(url + "api/info", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        for i, (x, y) in enumerate([(60, 70), (200, 70), (140, 100)]):
            r = httpx.post(url + f"api/images/{i}/accept", json={"points": [[x, y, 1]], "choice": 1}, timeout=60)
            assert r.status_code == 200, r.text
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert sorted(p.name for p in out.glob("*.tar")) == ["manual-000000.tar", "manual-000001.tar"]
    dm = SA1BDataModule(val_shards=str(out), img_size=256, max_masks=8, batch_size=3, num_workers=0)
    dm.setup("validate")
    (batch,) = list(dm.val_dataloader())
    assert batch["valid"].sum(1).tolist() == [1, 1, 1] and sum(batch["faults"].values()) == 0
    (out / "manual-000001.tar.tmp-4242-dead").write_bytes(b"half a shard of a killed write")
    c = _client(images, ckpt, out)  # resumes: the masks are there, the stale temporary file is gone
    assert [len(c.get(f"/api/images/{i}").json()["masks"]) for i in range(3)] == [1, 1, 1]
    assert not list(out.glob("*.tmp-*"))


def test_resuming_on_a_changed_input_folder_is_refused(ckpt, tmp_path):
    """Folder images are keyed by their sorted index (as the data engine keys them): a new image
    sorting first would shift every key, so the server refuses the old output instead of
    showing its masks on other images."""
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    for k in (1, 2):
        cv2.imwrite(str(images / f"im{k}.png"), make_test_image(H, W, seed=k)[..., ::-1])
    c = _client(images, ckpt, out)
    assert c.post("/api/images/0/accept", json={"points": [[60, 70, 1]]}).status_code == 200
    assert len(_client(images, ckpt, out).get("/api/images/0").json()["masks"]) == 1  # same input: resumes
    cv2.imwrite(str(images / "im0.png"), make_test_image(H, W, seed=0)[..., ::-1])
    snap = _snapshot(out)
    with pytest.raises(ValueError, match="holds image sa_0, which is not the input's image sa_0"):
        _client(images, ckpt, out)
    assert _snapshot(out) == snap


def test_semi_mode_on_shards_keeps_their_masks(images, ckpt, tmp_path):
    """--images given SA-1B-format shards (a manual session's output): semi mode opens an image
    with its person-drawn mask kept (no predicted IoU: confident, as the engine's semi stage
    treats it) plus new semi-stage masks, none mostly on the kept one, with fresh ids."""
    first = tmp_path / "round1"
    c = _client(images, ckpt, first)
    kept = c.post("/api/images/0/accept", json={"points": [[60, 70, 1]], "choice": 2}).json()
    settings = dict(points_per_side=4, pred_iou_thresh=0.5, stability_score_thresh=0.5, min_mask_region_area=0)
    out = tmp_path / "round2"
    c2 = _client(first, ckpt, out, semi=True, semi_settings=settings)
    assert c2.get("/api/info").json()["images"] == 1  # the shards hold the one annotated image
    masks = c2.get("/api/images/0").json()["masks"]
    assert masks[0]["id"] == kept["id"] and masks[0]["source"] == "manual"
    assert (_mask(masks[0]["runs"]) == _mask(kept["runs"])).all()
    new = masks[1:]
    assert new and {m["source"] for m in new} == {"semi"} and len({m["id"] for m in masks}) == len(masks)
    for m in new:
        bits = _mask(m["runs"])
        assert (bits & _mask(kept["runs"])).sum() <= 0.5 * bits.sum()
    (shard,) = out.glob("*.tar")
    assert shard.name == "manual-000000.tar"  # under the input shard's name, as the data engine writes
