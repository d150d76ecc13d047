"""ONNX export of segany (python -m segany.export CKPT OUT --format onnx) and OnnxPredictor vs SamPredictor.

Builds the model with segany's builder (random init, every tensor perturbed so that none is
zero: the figures of the check need non-trivial outputs; the latency does not depend on the
weights), exports it as fp32 and as fp16 weights (export time, file sizes, the check's max |delta|
and mask IoU on the photos), then times, on one photo, the image embedding (set_image) and one
decode per click (3 masks at the photo's size, logits) of SamPredictor (PyTorch) and OnnxPredictor
(onnxruntime, CPU), the two alternating in one process, medians over --repeats.

    python benchmarks/onnx_speed.py [--model demo|vit_tiny|vit_b] [--threads 1] [--repeats 20]
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import segany  # noqa: E402
from segany.export.onnx_model import export_onnx  # noqa: E402
from segany.inference import OnnxPredictor, SamPredictor  # noqa: E402

PHOTOS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "photos")
MODELS = {
    # configs/experiment/demo.yaml
    "demo": dict(
        variant="vit_tiny", img_size=192, window_size=6, prompt_embed_dim=128, decoder_heads=4, decoder_mlp_dim=1024
    ),
    "vit_tiny": dict(variant="vit_tiny"),
    "vit_b": dict(variant="vit_b"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", choices=sorted(MODELS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--photos", default=os.path.join(PHOTOS, "*.jpg"), help="glob of the check / timing photos")
    a = p.parse_args()
    for name in ("onnx_ir", "onnxscript"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(a.threads)
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = a.threads
    photos = sorted(glob.glob(a.photos))[:3]
    if not photos:
        sys.exit(f"no photos match {a.photos}")
    torch.manual_seed(0)
    sam = segany.build_sam(**MODELS[a.model]).eval()
    with torch.no_grad():
        for t in sam.parameters():
            t.add_(torch.randn_like(t) * 0.01)
    names = [os.path.basename(f) for f in photos]
    print(f"model {a.model} ({MODELS[a.model]}), {a.threads} thread(s), check photos: {names}")
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {}
        for fp16 in (False, True):
            name = "fp16" if fp16 else "fp32"
            dirs[name] = os.path.join(tmp, name)
            t = time.perf_counter()
            r = export_onnx(sam, dirs[name], fp16=fp16, check_images=photos)
            total = time.perf_counter() - t
            sizes = ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in r.files.items())
            print(f"{name}: export {r.export_s:.1f} s + check {r.check_s:.1f} s (total {total:.1f} s); {sizes}")
            print(f"{name}: {r.summary()}")
        image = np.asarray(Image.open(photos[0]).convert("RGB"))
        h, w = image.shape[:2]
        preds = {"SamPredictor": SamPredictor(sam)}
        preds.update({f"OnnxPredictor {k}": OnnxPredictor(d, sess_options=opts) for k, d in dirs.items()})
        rng = np.random.default_rng(0)
        clicks = [np.array([[rng.uniform(0, w), rng.uniform(0, h)]]) for _ in range(a.repeats)]
        enc = {k: [] for k in preds}
        dec = {k: [] for k in preds}
        for k, pr in preds.items():  # warm up
            pr.set_image(image)
            pr.predict(point_coords=clicks[0], point_labels=np.array([1]), return_logits=True)
        for i in range(a.repeats):  # alternate: each round times every predictor once
            for k, pr in preds.items():
                t = time.perf_counter()
                pr.set_image(image)
                enc[k].append(time.perf_counter() - t)
                t = time.perf_counter()
                pr.predict(point_coords=clicks[i], point_labels=np.array([1]), return_logits=True)
                dec[k].append(time.perf_counter() - t)
        print(f"photo {os.path.basename(photos[0])} ({w}x{h}); medians over {a.repeats} rounds, alternating")
        for k in preds:
            print(
                f"{k:22s} encoder {1000 * np.median(enc[k]):7.1f} ms   decode/click {1000 * np.median(dec[k]):6.1f} ms"
            )


if __name__ == "__main__":
    main()
