"""Images/s of one data worker at SA-1B size.

Writes SA-1B-like shards (1500x2250 JPEGs of textured scenes, ~100 masks of all sizes per
json), then streams them through SA1BDataModule's training pipeline (tar parsing, json,
RLE checks, 64 masks sampled and decoded at 1024, image decoded, resized, normalised,
padded, collated) in the main process with one thread: that is one worker on one core.

    python benchmarks/data_throughput.py [--images 40] [--lowres] [--jitter] [--workers 0]

Target: >= 4 images/s per core; ViT-H training consumes ~0.4 images/s per GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from segany.data import SA1BDataModule  # noqa: E402
from segany.data.make_shards import write_shards  # noqa: E402
from segany.data.scenes import make_scene, scene_annotations  # noqa: E402


def sa1b_like(n_distinct: int, n_total: int, n_masks: int = 100, seed: int = 0):
    """SA-1B-sized samples: photo-like 1500x2250 JPEG (~0.5 MB), n_masks masks from a few
    hundred pixels to a third of the image, overlapping (SA-1B nests parts in wholes)."""
    h, w = 1500, 2250
    samples = []
    for i in range(n_distinct):
        rng = np.random.default_rng([seed, i])
        image, _ = make_scene(rng, h, w, 40)
        image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)  # photo-like entropy
        masks = []
        while len(masks) < n_masks:
            scale = float(np.exp(rng.uniform(np.log(0.01), np.log(0.6))))
            m = np.zeros((h, w), np.uint8)
            cx, cy = int(rng.uniform(0, w)), int(rng.uniform(0, h))
            axes = (max(3, int(scale * w / 2 * rng.uniform(0.5, 1))), max(3, int(scale * h / 2 * rng.uniform(0.5, 1))))
            cv2.ellipse(m, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
            if m.any():
                masks.append(m.astype(bool))
        ok, jpg = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
        meta = {"image": {"image_id": i, "width": w, "height": h}, "annotations": scene_annotations(rng, masks, i)}
        samples.append((jpg.tobytes(), meta))
    for k in range(n_total):
        jpg, meta = samples[k % n_distinct]
        yield f"sa_{k}", "jpg", jpg, meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=40, help="images timed (after 4 warm-up images)")
    ap.add_argument("--distinct", type=int, default=6, help="distinct scenes (repeated to fill the shards)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0, help="0: time one worker in this process")
    ap.add_argument("--lowres", action="store_true", help="also produce 256x256 targets")
    ap.add_argument("--jitter", action="store_true", help="large-scale jitter 0.1-2.0 and flip")
    ap.add_argument("--dir", default=None, help="where to write the shards (default: a temp dir)")
    args = ap.parse_args()

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    warm = 2 * args.batch_size
    total = args.images + warm
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        t0 = time.perf_counter()
        paths = write_shards(sa1b_like(args.distinct, total), tmp, "sa", shard_size=(total + 1) // 2)
        size = sum(os.path.getsize(p) for p in paths) / total
        print(f"wrote {total} SA-1B-size samples ({size / 1e6:.2f} MB each) in {time.perf_counter() - t0:.1f} s")
        dm = SA1BDataModule(
            paths,
            batch_size=args.batch_size,
            num_workers=args.workers,
            img_size=1024,
            max_masks=64,
            lowres_targets=args.lowres,
            jitter=args.jitter,
            flip=args.jitter,
            epoch_length=total // args.batch_size,
            interleave=1,
            resampled=False,
        )
        dm.setup("fit")
        loader = dm.train_dataloader()
        n, t_start = 0, None
        masks = 0
        for batch in loader:
            n += batch["image"].shape[0]
            masks += int(batch["valid"].sum())
            if n == warm:
                t_start, c_start, n0, masks = time.perf_counter(), time.process_time(), n, 0
        elapsed, cpu = time.perf_counter() - t_start, time.process_time() - c_start
        rate = (n - n0) / elapsed
    who = "per worker (1 core)" if args.workers == 0 else f"with {args.workers} workers"
    print(
        f"{rate:.2f} images/s {who}: 1500x2250 JPEG, 100 masks in the json, "
        f"{masks / (n - n0):.1f} masks/image sampled, 1024 output, lowres={args.lowres}, jitter={args.jitter}"
    )
    if args.workers == 0:  # wall time counts other processes' load on a shared machine; CPU time does not
        print(f"{(n - n0) / cpu:.2f} images per CPU-second of this process")


if __name__ == "__main__":
    main()
