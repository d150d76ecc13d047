"""How much of a mask's appearance its crop embedding carries, and a control embedding that carries it all.

The text prompt's CPU demonstration (experiments/text_prompt.md) trains SAM on the embeddings of a
randomly initialised CLIP. This script measures what those embeddings say about their mask, and
writes the diagnostic control used there:

    python benchmarks/text_prompt_probe.py data/synthetic_3000                       # probe .clip.npz
    python benchmarks/text_prompt_probe.py data/synthetic_3000 --write-colour .colour.npz

Probe (printed): over the held-out shards' masks, the mean cosine similarity between the
embeddings of two different masks of one image, and the held-out R^2 with which a linear map
(ridge regression fitted on the training shards' masks) reads each mask's mean R, G, B colour
from its embedding. --write-colour: beside every shard, `<shard><suffix>` in the sidecar format
(segany.data.formats.clip_sidecar) with, for the masks the CLIP sidecar lists, the embedding
"mean colour of the mask's pixels through a fixed random 3 -> D map, L2-normalised": an
embedding that names the object's colour exactly (train with data.clip_sidecar=<suffix>).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from segany.data.decode import decode_image, decode_mask  # noqa: E402
from segany.data.faults import FaultCounter  # noqa: E402
from segany.data.formats import clip_sidecar  # noqa: E402
from segany.data.streams.reader import read_pairs  # noqa: E402


def masks_of(shard: str, suffix: str):
    """-> ids (A,), embeddings (A, D), mean colours (A, 3) in [0, 1], image index (A,) of the
    masks listed in the shard's sidecar."""
    ids, emb, _ = clip_sidecar.read(clip_sidecar.sidecar_path(shard, suffix))
    row = {int(i): k for k, i in enumerate(ids)}
    order, colours, image = [], [], []
    for n, p in enumerate(read_pairs(shard, 0, FaultCounter(5))):
        img = None
        for a in json.loads(p.json)["annotations"]:
            if int(a["id"]) not in row:
                continue
            img = decode_image(p.image, f"{shard}:{p.key}") if img is None else img
            order.append(row[int(a["id"])])
            colours.append(img[decode_mask(a["segmentation"])].mean(0) / 255.0)
            image.append(n)
    order = np.array(order, np.int64)
    return ids[order], emb[order], np.array(colours).reshape(-1, 3), np.array(image, np.int64)


def probe(train, val) -> None:
    _, xv, yv, img = (np.concatenate(c) for c in zip(*val))
    xn = xv / np.linalg.norm(xv, axis=1, keepdims=True)
    sims = [
        (xn[img == i] @ xn[img == i].T)[~np.eye(int((img == i).sum()), dtype=bool)].mean()
        for i in np.unique(img)
        if (img == i).sum() > 1
    ]
    print(f"held-out masks {len(xv)}: mean cosine similarity of two masks of one image {np.mean(sims):.3f}")
    _, xt, yt, _ = (np.concatenate(c) for c in zip(*train))
    mu, sd = xt.mean(0), xt.std(0) + 1e-9
    a, b = np.c_[(xt - mu) / sd, np.ones(len(xt))], np.c_[(xv - mu) / sd, np.ones(len(xv))]
    w = np.linalg.solve(a.T @ a + np.eye(a.shape[1]), a.T @ yt)  # ridge, lambda 1
    r2 = 1 - ((b @ w - yv) ** 2).sum(0) / ((yv - yv.mean(0)) ** 2).sum(0)
    print(f"mean colour read linearly from the embedding (fit on {len(xt)} training masks): held-out R^2 "
          f"R {r2[0]:.3f}  G {r2[1]:.3f}  B {r2[2]:.3f}")  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="folder of SA-1B-format shards (train-*.tar, val-*.tar) with CLIP sidecars")
    p.add_argument("--suffix", default=clip_sidecar.SUFFIX, help="the sidecars to probe")
    p.add_argument("--train-shards", type=int, default=5, help="training shards the linear map is fitted on")
    p.add_argument("--write-colour", default=None, metavar="SUFFIX", help="write the mean-colour control sidecars")
    a = p.parse_args(argv)
    train = sorted(glob.glob(os.path.join(a.root, "train-*.tar")))
    val = sorted(glob.glob(os.path.join(a.root, "val-*.tar")))
    if not train or not val:
        print(f"error: {a.root} holds no train-*.tar and val-*.tar shards", file=sys.stderr)
        return 2
    if a.write_colour:
        rng = np.random.default_rng(0)
        proj = None
        for shard in train + val:
            ids, emb, colours, _ = masks_of(shard, a.suffix)
            proj = rng.standard_normal((3, emb.shape[1])) if proj is None else proj
            e = (colours - 0.5) @ proj
            e /= np.linalg.norm(e, axis=1, keepdims=True)
            path = clip_sidecar.sidecar_path(shard, a.write_colour)
            clip_sidecar.write(path, ids, e, {"clip": "mean colour (benchmarks/text_prompt_probe.py)"})
        print(f"wrote {len(train) + len(val)} colour sidecars (*{a.write_colour}) under {a.root}")
        return 0
    probe([masks_of(s, a.suffix) for s in train[: a.train_shards]], [masks_of(s, a.suffix) for s in val])
    return 0


if __name__ == "__main__":
    sys.exit(main())
