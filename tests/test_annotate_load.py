"""Several annotators at once on one output folder: the real server (uvicorn on a loopback port,
in a thread) and N_CLIENTS client threads accepting, brushing and deleting masks on the same
three images (two of them share a shard). Afterwards the shards hold exactly the masks whose
accept was acknowledged and whose delete was not, each with the pixels its last acknowledged
accept / brush returned, and the SA-1B reader reads them without a fault."""

import json
import random
import socket
import tarfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

import segany.annotate.session as session_module  # noqa: E402
import segany.annotate.store as store_module  # noqa: E402
from segany.annotate import create_app  # noqa: E402
from segany.data import SA1BDataModule  # noqa: E402

try:
    from _official import build_blob_sam, make_test_image
except ImportError:  # tests/ imported as a package
    from tests._official import build_blob_sam, make_test_image

H, W = 200, 300
N_IMAGES = 3  # shard_size 2: images 0 and 1 share manual-000000.tar
N_CLIENTS = 8
OPS = 20  # per client
DEADLINE = 40.0  # seconds for the whole run
STROKE = {"x": 280.0, "y": 180.0, "r": 4.0}


@contextmanager
def serve(app):
    """uvicorn serving `app` on a free loopback port, in a thread -> its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started:
        assert thread.is_alive() and time.monotonic() - t0 < 30, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def make_inputs(root: Path):
    """-> (images folder, blob-model checkpoint) under root."""
    images = root / "images"
    images.mkdir()
    for k in range(N_IMAGES):
        cv2.imwrite(str(images / f"im{k}.png"), make_test_image(H, W, seed=k)[..., ::-1])
    ckpt = root / "blob.pth"
    torch.save(build_blob_sam(seed=0).state_dict(), ckpt)
    return images, ckpt


def runs_mask(runs):
    """The page's row-major runs (background first) -> (H, W) bool."""
    flat = np.repeat(np.arange(len(runs)) % 2 == 1, runs)
    assert flat.size == H * W
    return flat.reshape(H, W)


def stored_masks(out: Path) -> dict:
    """(image key, mask id) -> (H, W) bool of every mask in the output shards (tarfile + pycocotools)."""
    got = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as t:
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(t.extractfile(m).read())
                    for a in meta["annotations"]:
                        rle = {"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()}
                        got[(m.name[:-5], a["id"])] = mask_utils.decode(rle).astype(bool)
    return got


class Annotator(threading.Thread):
    """One client: OPS random operations on random images (so images are shared), with its own
    httpx connection. It brushes only masks it created and deletes any mask it sees. Records
    every acknowledged change; any other answer than the ones allowed is an error."""

    def __init__(self, url: str, seed: int, deadline: float):
        super().__init__(daemon=True)
        self.url, self.rng, self.deadline = url, random.Random(seed), deadline
        self.accepted = {}  # (image, id) -> runs the accept returned
        self.brushed = {}  # (image, id) -> runs the last acknowledged brush returned
        self.deleted = []  # (image, id) whose delete was acknowledged
        self.gone = []  # (image, id) a brush / delete found missing (404)
        self.errors = []

    def post(self, c, path, body=None):
        r = c.post(self.url + path, json=body) if body is not None else c.post(self.url + path)
        if r.status_code not in (200, 404):
            self.errors.append(f"POST {path} {body}: {r.status_code} {r.text[:200]}")
        return r

    def run(self):
        try:
            with httpx.Client(timeout=30) as c:
                for _ in range(OPS):
                    if time.monotonic() > self.deadline:
                        self.errors.append("ran past the deadline")
                        return
                    self.step(c)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(repr(exc))

    def step(self, c):
        rng, i = self.rng, self.rng.randrange(N_IMAGES)
        mine = [k for k in self.accepted if k[0] == i and k not in self.deleted and k not in self.gone]
        kind = rng.choices(["accept", "brush", "delete"], [0.5, 0.25 if mine else 0, 0.25])[0]
        if kind == "accept":
            prompt = {"points": [[rng.uniform(5, W - 5), rng.uniform(5, H - 5), 1]], "multimask": True}
            shown = c.post(f"{self.url}/api/images/{i}/decode", json=prompt).json()["masks"]
            choice = rng.randrange(3)
            r = self.post(c, f"/api/images/{i}/accept", {**prompt, "choice": choice, "clicks": 1})
            if r.status_code == 200:
                if r.json()["runs"] != shown[choice]:
                    self.errors.append(f"image {i}: accepted mask differs from the decoded choice {choice}")
                self.accepted[(i, r.json()["id"])] = r.json()["runs"]
            elif "empty" not in r.text:
                self.errors.append(f"accept on image {i}: {r.text}")
        elif kind == "brush":
            key = rng.choice(mine)
            stroke = {"x": rng.uniform(0, W), "y": rng.uniform(0, H), "r": rng.uniform(2, 8), "erase": False}
            r = self.post(c, f"/api/images/{i}/masks/{key[1]}/brush", {"strokes": [stroke], "seconds": 1})
            if r.status_code == 200:
                self.brushed[key] = r.json()["runs"]
            else:
                self.gone.append(key)
        else:
            masks = c.get(f"{self.url}/api/images/{i}").json()["masks"]
            listing = c.get(f"{self.url}/api/images")  # reads every shard while others rewrite them
            if listing.status_code != 200:
                self.errors.append(f"GET /api/images: {listing.status_code} {listing.text[:200]}")
            if masks:
                mid = rng.choice(masks)["id"]
                r = self.post(c, f"/api/images/{i}/masks/{mid}/delete")
                (self.deleted if r.status_code == 200 else self.gone).append((i, mid))


def test_concurrent_annotators_keep_exactly_the_acknowledged_masks(tmp_path, monkeypatch):
    images, ckpt = make_inputs(tmp_path)
    out = tmp_path / "out"
    embed, embedded = session_module.Model._embed, []

    def counted(self, gen, model, i, load_image):
        embedded.append(i)
        return embed(self, gen, model, i, load_image)

    monkeypatch.setattr(session_module.Model, "_embed", counted)
    app = create_app(str(images), str(ckpt), str(out), shard_size=2)
    t0 = time.monotonic()
    with serve(app) as url:
        clients = [Annotator(url, seed, t0 + DEADLINE) for seed in range(N_CLIENTS)]
        [c.start() for c in clients]
        [c.join(max(0.0, t0 + DEADLINE + 5 - time.monotonic())) for c in clients]
        assert not any(c.is_alive() for c in clients), "a client hung"
        listing = httpx.get(url + "/api/images", timeout=30).json()
    assert [e for c in clients for e in c.errors] == []
    assert sorted(embedded) == list(range(N_IMAGES))  # each image embedded once, however many open it at once

    accepted = [k for c in clients for k in c.accepted]
    deleted = [k for c in clients for k in c.deleted]
    assert len(set(accepted)) == len(accepted), "one mask id handed out twice"
    assert len(set(deleted)) == len(deleted), "one mask deleted twice"
    assert set(deleted) <= set(accepted)
    assert {k for c in clients for k in c.gone} <= set(deleted)  # a 404 only for a mask someone deleted
    counts = [sum(1 for c in clients for _ in c.accepted), len(deleted)]
    assert counts[0] >= N_CLIENTS and counts[1] >= 1, counts  # the run did exercise both

    expected = {}  # what the client that made each surviving mask last got back
    for c in clients:
        for k, runs in c.accepted.items():
            if k not in deleted:
                expected[(f"sa_{k[0]}", k[1])] = runs_mask(c.brushed.get(k, runs))
    got = stored_masks(out)
    assert sorted(got) == sorted(expected)
    for k in expected:
        assert (got[k] == expected[k]).all(), k
    per_image = [sum(1 for key in expected if key[0] == f"sa_{i}") for i in range(N_IMAGES)]
    assert [row["masks"] for row in listing["images"]] == per_image

    present = [n for n in per_image if n]
    dm = SA1BDataModule(val_shards=str(out), img_size=256, max_masks=64, batch_size=N_IMAGES, num_workers=0)
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    assert sum(sum(b["faults"].values()) for b in batches) == 0
    assert sorted(n for b in batches for n in b["valid"].sum(1).tolist()) == sorted(present)


def test_undo_under_concurrent_accepts_steps_back_one_change_at_a_time(tmp_path, monkeypatch):
    """Undo restores the state before the newest change of the image. With N_CLIENTS accepts
    racing on one image, the undo history must be in the order the shard was written: N_CLIENTS
    undos then remove one mask each, newest first. A random pause after each shard write widens
    the moment between the write and its undo record, where a thread switch may fall."""
    images, ckpt = make_inputs(tmp_path)
    out = tmp_path / "out"
    app = create_app(str(images), str(ckpt), str(out), shard_size=2)
    update, rng, rng_lock = store_module.ShardStore.update, random.Random(0), threading.Lock()

    def paused_update(self, *args):
        result = update(self, *args)
        with rng_lock:
            pause = rng.uniform(0, 0.1)
        time.sleep(pause)
        return result

    monkeypatch.setattr(store_module.ShardStore, "update", paused_update)
    with serve(app) as url:
        ids, errors = [], []

        def accept(k):
            r = httpx.post(f"{url}/api/images/0/accept", json={"points": [[20 + 30 * k, 60 + 10 * k, 1]]}, timeout=30)
            (ids.append(r.json()["id"]) if r.status_code == 200 else errors.append(r.text))

        threads = [threading.Thread(target=accept, args=(k,)) for k in range(N_CLIENTS)]
        [t.start() for t in threads]
        [t.join(30) for t in threads]
        assert not errors and sorted(ids) == list(range(N_CLIENTS))
        left = []
        for _ in range(N_CLIENTS):
            r = httpx.post(f"{url}/api/images/0/undo", timeout=30)
            assert r.status_code == 200, r.text
            masks = httpx.get(f"{url}/api/images/0", timeout=30).json()["masks"]
            left.append([m["id"] for m in masks])
    # ids are given in write order (1 + the largest stored), so each undo drops the largest id
    assert left == [list(range(n)) for n in range(N_CLIENTS - 1, -1, -1)]
    assert not list(out.glob("*.tar"))


def test_reading_an_image_while_its_shard_is_removed(tmp_path, monkeypatch):
    """Deleting an image's last mask removes its shard (image 2 is alone in manual-000001.tar).
    A page opening that image at the same moment gets the masks before or after the delete,
    never an error: reads take the store's lock. A pause in the open's shard read makes the
    delete fall in the middle of it."""
    images, ckpt = make_inputs(tmp_path)
    out = tmp_path / "out"
    app = create_app(str(images), str(ckpt), str(out), shard_size=2)
    read_pairs, calls = store_module.read_pairs, []

    def slow_read_pairs(*args):
        calls.append(args)
        if len(calls) == 1:  # the open's read (the delete's own read comes second)
            time.sleep(0.5)
        return read_pairs(*args)

    with serve(app) as url:
        r = httpx.post(f"{url}/api/images/2/accept", json={"points": [[200, 70, 1]]}, timeout=30)
        assert r.status_code == 200 and (out / "manual-000001.tar").exists()
        monkeypatch.setattr(store_module, "read_pairs", slow_read_pairs)
        got = {}
        opener = threading.Thread(target=lambda: got.update(r=httpx.get(f"{url}/api/images/2", timeout=30)))
        opener.start()
        time.sleep(0.1)  # the open is reading the shard
        delete = httpx.post(f"{url}/api/images/2/masks/{r.json()['id']}/delete", timeout=30)
        opener.join(30)
    assert delete.status_code == 200 and delete.json() == {"masks": 0}
    assert got["r"].status_code == 200, got["r"].text
    assert [m["id"] for m in got["r"].json()["masks"]] == [r.json()["id"]]  # read before the delete
    assert not (out / "manual-000001.tar").exists()


def test_a_deleted_masks_id_is_never_given_again(tmp_path):
    """Another annotator's page may still show a deleted mask: its id must not name the next
    accepted one (a brush there would change someone else's mask), after a restart neither."""
    from fastapi.testclient import TestClient

    images, ckpt = make_inputs(tmp_path)
    out = tmp_path / "out"
    c = TestClient(create_app(str(images), str(ckpt), str(out), shard_size=2))
    prompt = {"points": [[60, 70, 1]]}
    assert [c.post("/api/images/0/accept", json=prompt).json()["id"] for _ in range(2)] == [0, 1]
    assert c.post("/api/images/0/masks/1/delete").json() == {"masks": 1}
    assert c.post("/api/images/0/accept", json=prompt).json()["id"] == 2
    assert c.post("/api/images/0/masks/1/brush", json={"strokes": [STROKE]}).status_code == 404
    for k in (2, 0):
        assert c.post(f"/api/images/0/masks/{k}/delete").status_code == 200
    assert not list(out.glob("*.tar"))  # the image left the output with its last mask
    again = TestClient(create_app(str(images), str(ckpt), str(out), shard_size=2))
    assert again.post("/api/images/0/accept", json=prompt).json()["id"] == 3
