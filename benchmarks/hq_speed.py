"""The HQ token's cost: SamPredictor with an HQ-SAM model against the same SAM without it.

Both come from one checkpoint: --checkpoint is an HQ-SAM run (experiment=hq_demo / hq_sam) or any
segany checkpoint (its HQ parts then fresh, the cost is the same); the SAM model is its weights
without the HQ parts. Per image: set_image (encoder; HQ also keeps an early block's features);
per prompt: predict with one point (decoder; HQ adds its token, the feature fusion and one mask).
Both models in one process, runs alternated (A B A B ...), medians reported.

    python benchmarks/hq_speed.py --checkpoint runs/hq_demo/checkpoints/last.ckpt --threads 1
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's segany

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos"


def models(checkpoint: str):
    import dataclasses

    import segany
    from segany.modeling.hq import HQ_KEYS
    from segany.modeling.sam import assemble

    hq = segany.build_sam(checkpoint=checkpoint, hq_token=True).eval()
    sam = assemble(dataclasses.replace(hq.config, hq_token=False)).eval()
    sam.load_state_dict({k: v for k, v in hq.state_dict().items() if not k.startswith(HQ_KEYS)})
    return {"sam": sam, "hq": hq}


def image(size: int) -> np.ndarray:
    photos = sorted(PHOTOS.glob("*.jpg"))
    if photos:
        from PIL import Image

        return np.asarray(Image.open(photos[0]).convert("RGB"))
    return np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--runs", type=int, default=5, help="alternating rounds")
    p.add_argument("--prompts", type=int, default=20, help="single-point prompts per round")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from segany.inference import SamPredictor

    ms = models(a.checkpoint)
    img = image(ms["sam"].img_size)
    h, w = img.shape[:2]
    pts = np.random.default_rng(1).uniform([0, 0], [w, h], (a.prompts, 2))
    preds = {k: SamPredictor(m) for k, m in ms.items()}
    t_img = {k: [] for k in ms}
    t_pr = {k: [] for k in ms}
    with torch.inference_mode():
        for k in ms:  # warm-up
            preds[k].set_image(img)
            preds[k].predict(point_coords=pts[:1], point_labels=np.array([1]))
        for _ in range(a.runs):
            for k, pr in preds.items():
                t0 = time.perf_counter()
                pr.set_image(img)
                t_img[k].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                for q in pts:
                    pr.predict(point_coords=q[None], point_labels=np.array([1]), multimask_output=False)
                t_pr[k].append((time.perf_counter() - t0) / len(pts))
    med = lambda v: statistics.median(v) * 1e3  # noqa: E731
    n = torch.get_num_threads()
    print(f"image {w}x{h}, model input {ms['sam'].img_size} px, {a.runs} alternating runs, threads {n}")
    print("| model | set_image ms | predict ms / prompt |")
    print("|---|---|---|")
    for k in ms:
        print(f"| {k} | {med(t_img[k]):.1f} | {med(t_pr[k]):.2f} |")
    print(
        f"HQ / SAM: set_image {med(t_img['hq']) / med(t_img['sam']):.2f}x, "
        f"predict {med(t_pr['hq']) / med(t_pr['sam']):.2f}x"
    )


if __name__ == "__main__":
    main()
