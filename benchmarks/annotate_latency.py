"""Click-to-mask latency of the annotation server on CPU (segany.annotate).

Builds each model with segany's builder (random init: the latency does not depend on the
weights), writes it as a checkpoint file, starts the app on a real photo and times, through
the HTTP API (FastAPI TestClient: routing, JSON, decoding, the masks' runs), one single-click
decode request (3 masks) per random click after the image's embedding is cached; and the
embedding itself (opening the image).

    python benchmarks/annotate_latency.py [--clicks 50] [--photo /work/shared/data/photos/dog.jpg] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

import segany  # noqa: E402
from segany.annotate import create_app  # noqa: E402
from segany.modeling.checkpoint import save_official  # noqa: E402

MODELS = {
    "vit_b": dict(variant="vit_b"),
    # configs/experiment/demo.yaml
    "demo (vit_tiny 192 px, width 128)": dict(
        variant="vit_tiny", img_size=192, window_size=6, prompt_embed_dim=128, decoder_heads=4, decoder_mlp_dim=1024
    ),
}


def bench(name: str, kw: dict, photo: str, clicks: int, tmp: str) -> dict:
    torch.manual_seed(0)
    ckpt = os.path.join(tmp, name.split()[0] + ".pth")
    save_official(segany.build_sam(**kw).eval(), ckpt)
    images = os.path.join(tmp, "images")
    os.makedirs(images, exist_ok=True)
    shutil.copy(photo, images)
    c = TestClient(create_app(images, ckpt, os.path.join(tmp, "out-" + name.split()[0])))
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clicks", type=int, default=50)
    p.add_argument("--photo", default="/work/shared/data/photos/dog.jpg")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    from PIL import Image

    w, h = Image.open(args.photo).size
    if args.threads:
        torch.set_num_threads(args.threads)
    load, threads = os.getloadavg()[0], torch.get_num_threads()
    print(f"{os.path.basename(args.photo)} ({w}x{h}), {threads} threads, {args.clicks} clicks, load {load:.1f}")
    print(f"{'model':36s} {'embedding':>10s} {'click median':>13s} {'click p95':>10s}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw in MODELS.items():
            r = bench(name, kw, args.photo, args.clicks, tmp)
            print(f"{name:36s} {r['embed_s']:9.2f}s {r['median_ms']:11.0f}ms {r['p95_ms']:8.0f}ms", flush=True)


if __name__ == "__main__":
    main()
