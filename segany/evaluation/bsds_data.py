"""A BSDS500 folder as an evaluation dataset (``task=edges``): the images with every
annotator's boundary map, as the benchmark scores them.

Layout (the BSR release, ``BSR/BSDS500/data``): ``<root>/images/<split>/<id>.jpg`` and
``<root>/groundTruth/<split>/<id>.mat`` (a 1 x N cell of structs with ``Segmentation`` and
``Boundaries``, one per annotator); with ``split: null`` the files lie directly in ``images/``
and ``groundTruth/``. The images scored are those with a ground-truth file (as the benchmark
iterates its groundTruth folder), in sorted order, round robin over ranks.

A dataset entry like the datamodule ones (``_target_``, instantiated by sources.build_datamodule);
it only serves raw images (``eval_images``), so the batched ``points`` task cannot read it.
"""

from __future__ import annotations

import os
from typing import Iterator, Optional

import numpy as np

from segany.data.decode import decode_image, numeric_id
from segany.evaluation.sources import EvalImage


def load_bsds_ground_truth(path: str) -> list:
    """BSDS500 groundTruth/<split>/<id>.mat -> list of (H, W) bool boundary maps, one per annotator."""
    from scipy.io import loadmat

    try:
        gt = loadmat(path)["groundTruth"]
        return [np.asarray(gt[0, i]["Boundaries"][0, 0], bool) for i in range(gt.shape[1])]
    except (KeyError, ValueError, OSError, IndexError, TypeError) as exc:
        raise ValueError(f"{path}: not a BSDS groundTruth .mat (1xN cell of structs with Boundaries): {exc}") from None


class BSDS500:
    """root: the folder holding images/ and groundTruth/; split: train | val | test, or null."""

    def __init__(self, root: str, split: Optional[str] = "test", num_workers: int = 0):
        self.root, self.split = str(root), split
        sub = [] if split in (None, "") else [str(split)]
        self.image_dir = os.path.join(self.root, "images", *sub)
        self.gt_dir = os.path.join(self.root, "groundTruth", *sub)
        self.val_dataset = None
        self.ids: list = []

    def prepare_data(self) -> None:
        pass

    def setup(self, stage: Optional[str] = None) -> None:
        """List the ids with ground truth; each must have its image."""
        for d in (self.image_dir, self.gt_dir):
            if not os.path.isdir(d):
                raise FileNotFoundError(f"BSDS500 root={self.root} split={self.split}: no folder {d}")
        self.ids = sorted(f[:-4] for f in os.listdir(self.gt_dir) if f.endswith(".mat"))
        if not self.ids:
            raise FileNotFoundError(f"BSDS500: no .mat ground truth in {self.gt_dir}")
        missing = [i for i in self.ids if not os.path.isfile(os.path.join(self.image_dir, f"{i}.jpg"))]
        if missing:
            raise FileNotFoundError(
                f"BSDS500: {len(missing)} ground-truth file(s) without {self.image_dir}/<id>.jpg, e.g. {missing[0]}"
            )
        self.val_dataset = self.ids

    def val_dataloader(self):
        raise ValueError(f"BSDS500 ({self.root}): a boundary benchmark, read by task=edges only")

    def eval_images(self, rank: int = 0, world: int = 1, max_images: Optional[int] = None) -> Iterator[EvalImage]:
        """This rank's images (every world-th id from rank), at most ceil(max_images / world),
        each with .boundaries = the annotators' boundary maps."""
        ids = self.ids[rank::world]
        if max_images is not None:
            ids = ids[: -(-int(max_images) // world)]
        for i in ids:
            path = os.path.join(self.image_dir, f"{i}.jpg")
            with open(path, "rb") as f:
                image = decode_image(f.read(), path)
            gt_path = os.path.join(self.gt_dir, f"{i}.mat")
            gts = load_bsds_ground_truth(gt_path)
            if any(g.shape != image.shape[:2] for g in gts):
                raise ValueError(f"{gt_path}: boundaries are {gts[0].shape}, the image {image.shape[:2]}")
            yield EvalImage(i, numeric_id(i), image, boundaries=gts)
