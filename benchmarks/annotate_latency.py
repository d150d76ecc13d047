"""Click-to-mask latency of the annotation server on CPU (segany.annotate).

Builds each model with segany's builder (random init: the latency does not depend on the
weights), writes it as a checkpoint file, starts the app on a real photo and times, through
the HTTP API (FastAPI TestClient: routing, JSON, decoding, the masks' runs), one single-click
decode request (3 masks) per random click after the image's embedding is cached; and the
embedding itself (opening the image).

With --clients N > 1, the same with N clients at once: the real server (uvicorn on a loopback port, in a
thread) and N client threads (httpx), client c on image c % --images (copies of the photo,
each embedded on its own; default one image per client), each opening its image and then, once
all are open, sending --clicks decode requests; the click latency's p50 / p95 over all clients,
and the longest wait to open an image (the embeddings computed at the same time).

    python benchmarks/annotate_latency.py [--clicks 50] [--photo /work/shared/data/photos/dog.jpg] [--threads N]
    python benchmarks/annotate_latency.py --clients 8 [--images 8] [--models demo] [--clicks 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import uvicorn  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

import segany  # noqa: E402
from segany.annotate import create_app  # noqa: E402
from segany.modeling.checkpoint import save_official  # noqa: E402

MODELS = {  # --models name -> (printed name, segany.build_sam keywords)
    "vit_b": ("vit_b", dict(variant="vit_b")),
    # configs/experiment/demo.yaml
    "demo": (
        "demo (vit_tiny 192 px, width 128)",
        dict(
            variant="vit_tiny", img_size=192, window_size=6, prompt_embed_dim=128, decoder_heads=4, decoder_mlp_dim=1024
        ),
    ),
}


def setup(name: str, kw: dict, photo: str, n_images: int, tmp: str) -> tuple:
    """-> (images folder holding n_images copies of the photo, checkpoint of the model)."""
    torch.manual_seed(0)
    ckpt = os.path.join(tmp, name + ".pth")
    save_official(segany.build_sam(**kw).eval(), ckpt)
    images = os.path.join(tmp, f"images-{n_images}")
    os.makedirs(images, exist_ok=True)
    ext = os.path.splitext(photo)[1]
    for k in range(n_images):
        shutil.copy(photo, os.path.join(images, f"im{k:03d}{ext}"))
    return images, ckpt


def bench(name: str, kw: dict, photo: str, clicks: int, tmp: str) -> dict:
    images, ckpt = setup(name, kw, photo, 1, tmp)
    c = TestClient(create_app(images, ckpt, os.path.join(tmp, "out-" + name)))
    t0 = time.perf_counter()
    info = c.get("/api/images/0").json()
    embed = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    times = []
    for _ in range(clicks + 2):
        x, y = rng.uniform(0, info["width"]), rng.uniform(0, info["height"])
        t0 = time.perf_counter()
        r = c.post("/api/images/0/decode", json={"points": [[x, y, 1]], "multimask": True})
        times.append(time.perf_counter() - t0)
        assert r.status_code == 200 and len(r.json()["masks"]) == 3
    ms = 1000 * np.array(times[2:])  # the first two warm up
    return {"embed_s": embed, "median_ms": float(np.median(ms)), "p95_ms": float(np.percentile(ms, 95))}


class Server:
    """uvicorn serving `app` on a free loopback port, in a thread (as `python -m segany.annotate`)."""

    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def bench_load(name: str, kw: dict, photo: str, clicks: int, tmp: str, clients: int, n_images: int) -> dict:
    images, ckpt = setup(name, kw, photo, n_images, tmp)
    app = create_app(images, ckpt, os.path.join(tmp, f"out-{name}-{clients}"))
    opened, times, errors = [0.0] * clients, [[] for _ in range(clients)], []
    all_open = threading.Barrier(clients)

    def client(c: int) -> None:
        i, rng = c % n_images, np.random.default_rng(c)
        try:
            with httpx.Client(base_url=url, timeout=3600) as h:
                t0 = time.perf_counter()
                info = h.get(f"/api/images/{i}").json()
                opened[c] = time.perf_counter() - t0
                all_open.wait()
                for _ in range(clicks + 2):
                    x, y = rng.uniform(0, info["width"]), rng.uniform(0, info["height"])
                    t0 = time.perf_counter()
                    r = h.post(f"/api/images/{i}/decode", json={"points": [[x, y, 1]], "multimask": True})
                    times[c].append(time.perf_counter() - t0)
                    assert r.status_code == 200 and len(r.json()["masks"]) == 3, r.text
        except BaseException as exc:
            all_open.abort()
            errors.append(exc)

    with Server(app) as url:
        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        t0 = time.perf_counter()
        [t.start() for t in threads]
        [t.join() for t in threads]
        wall = time.perf_counter() - t0 - max(opened)
    if errors:
        raise errors[0]
    ms = 1000 * np.concatenate([t[2:] for t in times])  # each client's first two warm up
    return {
        "embed_s": max(opened),
        "median_ms": float(np.median(ms)),
        "p95_ms": float(np.percentile(ms, 95)),
        "clicks_per_s": ms.size / wall,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clicks", type=int, default=50)
    p.add_argument("--photo", default="/work/shared/data/photos/dog.jpg")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--clients", type=int, default=1, help="concurrent clients (1: one TestClient, no server)")
    p.add_argument("--images", type=int, default=None, help="distinct images the clients work on (default: one each)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    args = p.parse_args()
    models = args.models.split(",")
    if set(models) - set(MODELS) or args.clients < 1:
        p.error(f"--models: choose from {', '.join(MODELS)}; --clients: at least 1")
    n_images = args.images or args.clients
    from PIL import Image

    w, h = Image.open(args.photo).size
    if args.threads:
        torch.set_num_threads(args.threads)
    load, threads = os.getloadavg()[0], torch.get_num_threads()
    print(f"{os.path.basename(args.photo)} ({w}x{h}), {threads} threads, {args.clicks} clicks, load {load:.1f}")
    if args.clients > 1:
        print(f"{args.clients} concurrent clients on {n_images} image(s); clicks per client: {args.clicks}")
    print(f"{'model':36s} {'embedding':>10s} {'click median':>13s} {'click p95':>10s}")
    with tempfile.TemporaryDirectory() as tmp:
        for key in models:
            name, kw = MODELS[key]
            if args.clients == 1:
                r = bench(key, kw, args.photo, args.clicks, tmp)
            else:
                r = bench_load(key, kw, args.photo, args.clicks, tmp, args.clients, n_images)
            line = f"{name:36s} {r['embed_s']:9.2f}s {r['median_ms']:11.0f}ms {r['p95_ms']:8.0f}ms"
            extra = f"   {r['clicks_per_s']:.1f} clicks/s in all" if "clicks_per_s" in r else ""
            print(line + extra, flush=True)


if __name__ == "__main__":
    main()
