"""A weighted mixture of SA-1B-format shard sets, each with its own filters.

The SAM data-engine ablation (paper §7.6, Fig. 13 left) trains on the masks of the
assisted-manual, semi-automatic and fully automatic stages, with the manual and
semi-automatic ones oversampled 10x. Here each stage is a *source*: a shard list with a
sampling weight and optional per-source filters.

    sources:
      manual:    {shards: ".../manual_{000..010}.tar", weight: 10, num_images: 120000, jitter: true}
      automatic: {shards: ".../sa_{000000..000999}.tar", weight: 1, num_images: 11000000}
    weighting: per_image      # P(source) ~ weight x num_images: weight = per-image oversampling
    use: [manual, automatic]  # which sources are active (null: all with weight > 0)

Per source:
  shards          shard spec (as ``train_shards``)
  weight          >= 0; 0 switches the source off
  num_images      images in the source (needed with ``weighting: per_image``)
  num_shards      only the first N shards (fixed subset, as ``train_num_shards``)
  image_fraction  keep an image iff crc32(key) / 2^32 < fraction: a fixed subset of the images,
                  independent of shard order, rank, worker and seed
  max_area_frac, min_area, min_predicted_iou, min_stability_score, include_crowd, max_masks,
  jitter, jitter_scale, flip
                  per-source overrides of the datamodule's sample keys (mask filters and
                  augmentation; the rest of the sample keys are shared)

Sampling: every rank x worker slot runs one stream per source over its own share of that
source's shards (round robin, as SA1BStream) and, for each sample, draws the source with the
configured probabilities from the slot's RNG. The position saved in checkpoints is every
source's position plus the RNG state, so a resumed run continues exactly.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Optional

import numpy as np

from segany.data.datamodules.base import sample_config
from segany.data.datamodules.sa1b import SA1BDataModule, SA1BStream
from segany.data.faults import FaultCounter
from segany.data.sample import Record, SampleConfig
from segany.data.streams.dataset import StreamDataset
from segany.data.streams.shards import check_readable, resolve, subset, summary

log = logging.getLogger("segany.data")

SAMPLE_KEYS = (
    "max_area_frac",
    "min_area",
    "min_predicted_iou",
    "min_stability_score",
    "include_crowd",
    "max_masks",
    "jitter",
    "jitter_scale",
    "flip",
)
SOURCE_KEYS = ("shards", "weight", "num_images", "num_shards", "image_fraction") + SAMPLE_KEYS
WEIGHTINGS = ("proportion", "per_image")


def in_fraction(key: str, fraction: Optional[float]) -> bool:
    """Whether image `key` belongs to the fixed `fraction` subset (None: every image)."""
    if fraction is None:
        return True
    return zlib.crc32(key.encode()) < fraction * 2**32


@dataclass
class Source:
    name: str
    shards: object
    weight: float = 1.0
    num_images: Optional[int] = None
    num_shards: Optional[int] = None
    image_fraction: Optional[float] = None
    sample: dict = field(default_factory=dict)  # per-source sample-key overrides

    @classmethod
    def parse(cls, name: str, spec) -> "Source":
        where = f"data.sources.{name}"
        if not isinstance(spec, Mapping):
            raise ValueError(f"{where}: expected a mapping with at least 'shards', got {spec!r}")
        spec = dict(spec)
        unknown = sorted(set(spec) - set(SOURCE_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {list(SOURCE_KEYS)}")
        if not spec.get("shards"):
            raise ValueError(f"{where}.shards is not set")
        weight = spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(f"{where}.weight={weight!r}: a number >= 0")
        n_img = spec.get("num_images")
        if n_img is not None and (isinstance(n_img, bool) or not isinstance(n_img, int) or n_img < 1):
            raise ValueError(f"{where}.num_images={n_img!r}: a positive integer or null")
        n_sh = spec.get("num_shards")
        if n_sh is not None:
            subset(
                [""] * n_sh if isinstance(n_sh, int) and not isinstance(n_sh, bool) and n_sh > 0 else [],
                n_sh,
                f"{where}.num_shards",
            )
        frac = spec.get("image_fraction")
        if frac is not None and (isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac <= 1):
            raise ValueError(f"{where}.image_fraction={frac!r}: a fraction in (0, 1] or null")
        sample = {k: spec[k] for k in SAMPLE_KEYS if k in spec}
        return cls(name, spec["shards"], float(weight), n_img, n_sh, None if frac is None else float(frac), sample)


def mixture_probabilities(sources: list[Source], weighting: str) -> np.ndarray:
    """P(source) for each source: weight / sum (proportion) or weight x num_images / sum (per_image)."""
    if weighting == "per_image":
        missing = [s.name for s in sources if s.num_images is None]
        if missing:
            raise ValueError(f"data.weighting=per_image needs data.sources.<name>.num_images; missing for {missing}")
        mass = np.array([s.weight * s.num_images for s in sources], dtype=np.float64)
    else:
        mass = np.array([s.weight for s in sources], dtype=np.float64)
    return mass / mass.sum()


class MixtureStream(StreamDataset):
    """Training stream drawing each sample from one of several SA1BStreams (the children)."""

    def __init__(
        self,
        children: list[SA1BStream],
        probabilities,
        names: list[str],
        fractions: list[Optional[float]],
        cfg: SampleConfig,
        **kw,
    ):
        super().__init__(cfg, train=True, **kw)
        if not len(children) == len(probabilities) == len(names) == len(fractions):
            raise ValueError("one probability, name and fraction per child stream")
        self.children = list(children)
        self.probabilities = np.asarray(probabilities, dtype=np.float64)
        self.names = list(names)
        self.fractions = list(fractions)
        self._active = 0  # source of the record being turned into a sample (per worker copy)

    def set_topology(self, rank: int, world_size: int) -> None:
        super().set_topology(rank, world_size)
        for c in self.children:
            c.set_topology(rank, world_size)

    def _fresh_position(self, rng, slot, n_slots) -> dict:
        return {
            "sources": [c._fresh_position(rng, slot, n_slots) for c in self.children],
            "drawn": [0] * len(self.children),
        }

    def _train_records(self, position, rng, faults: FaultCounter, slot, n_slots) -> Iterator[Record]:
        streams = [
            c._train_records(position["sources"][k], rng, faults, slot, n_slots) for k, c in enumerate(self.children)
        ]
        cum = np.cumsum(self.probabilities)
        while True:
            k = min(int(np.searchsorted(cum, rng.random(), side="right")), len(streams) - 1)
            rec = next(streams[k])
            while not in_fraction(rec.key, self.fractions[k]):
                rec = next(streams[k])
            position["drawn"][k] += 1
            self._active = k
            yield rec

    def _sample(self, rec: Record, rng: np.random.Generator, faults: FaultCounter):
        # the record was just drawn from source self._active: its own filters apply
        saved, self.cfg = self.cfg, self.children[self._active].cfg
        try:
            return super()._sample(rec, rng, faults)
        finally:
            self.cfg = saved


class SA1BMixtureDataModule(SA1BDataModule):
    """SA-1B-format training data mixed from several shard sets (``sources``); validation from
    ``val_shards`` as SA1BDataModule. Keys: see configs/data/sa1b_mixture.yaml and this module's
    docstring. Batches as docs/contracts.md."""

    def __init__(
        self,
        sources=None,
        *,
        weighting: str = "proportion",
        use=None,
        train_shards=None,
        train_num_shards=None,
        **kwargs,
    ):
        if train_shards or train_num_shards is not None:
            raise ValueError(
                "data.train_shards / data.train_num_shards: not used by SA1BMixtureDataModule; "
                "give each source's shards (and num_shards) under data.sources"
            )
        super().__init__(train_shards=None, **kwargs)
        if sources is None or not isinstance(sources, Mapping) or not sources:
            raise ValueError("data.sources: a mapping name -> {shards, weight, ...} with at least one source")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"data.weighting={weighting!r}: expected one of {list(WEIGHTINGS)}")
        self.weighting = weighting
        self.sources = {str(name): Source.parse(str(name), spec) for name, spec in sources.items()}
        if use is not None:
            use = [use] if isinstance(use, str) else [str(u) for u in use]
            unknown = [u for u in use if u not in self.sources]
            if unknown or not use:
                raise ValueError(f"data.use={use!r}: names among data.sources {sorted(self.sources)}")
        self.use = list(use) if use is not None else list(self.sources)
        self.active = [self.sources[n] for n in self.use if self.sources[n].weight > 0]
        if not self.active:
            raise ValueError(f"data.use={self.use}: every selected source has weight 0")
        self.probabilities = {
            s.name: float(p) for s, p in zip(self.active, mixture_probabilities(self.active, self.weighting))
        }

    def _source_cfg(self, src: Source) -> SampleConfig:
        if not src.sample:
            return self.cfg
        c = self.cfg
        kw = dict(
            img_size=c.img_size,
            max_masks=c.max_masks,
            lowres_targets=c.lowres_targets,
            max_area_frac=c.max_area_frac,
            min_area=c.min_area,
            min_predicted_iou=c.min_predicted_iou,
            min_stability_score=c.min_stability_score,
            include_crowd=c.include_crowd,
            jitter=c.jitter is not None,
            jitter_scale=c.jitter or (0.1, 2.0),
            flip=c.flip,
            fast_jpeg=c.fast_jpeg,
        )
        kw.update(src.sample)
        try:
            return sample_config(**kw)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"data.sources.{src.name}: {exc}") from None

    def _source_urls(self, src: Source) -> list:
        urls = resolve(src.shards, check=False, what=f"data.sources.{src.name}.shards")
        return subset(urls, src.num_shards, f"data.sources.{src.name}.num_shards")

    def resolve_shards(self) -> dict:
        """As SA1BDataModule.resolve_shards; train: the total over the active sources, and
        each source's {count, first, last} under train.sources."""
        per = {src.name: summary(self._source_urls(src)) for src in self.active}
        train = {"count": sum(p["count"] for p in per.values()), "sources": per}
        self.resolved = {"train": train}
        if self.val_shards:
            self.resolved["val"] = summary(self._urls(self.val_shards, False, "data.val_shards"))
        return self.resolved

    def _train_stream(self) -> MixtureStream:
        children, fractions = [], []
        for src in self.active:
            what = f"data.sources.{src.name}.shards"
            urls = self._source_urls(src)
            if self.check_shards:
                check_readable(urls, what, src.shards)
            children.append(
                SA1BStream(
                    urls,
                    self._source_cfg(src),
                    interleave=self.interleave,
                    resampled=self.resampled,
                    clip_sidecar=self.clip_sidecar,  # text prompt: <shard>.clip.npz beside each source's shards
                    train=True,
                    batch_size=self.batch_size,
                    epoch_length=self.epoch_length,
                    seed=self.seed,
                    max_fault_warnings=self.max_fault_warnings,
                )
            )
            fractions.append(src.image_fraction)
        log.info("data mixture: %s", ", ".join(f"{n} {p:.4f}" for n, p in self.probabilities.items()))
        return MixtureStream(
            children,
            list(self.probabilities.values()),
            list(self.probabilities),
            fractions,
            self.cfg,
            batch_size=self.batch_size,
            epoch_length=self.epoch_length,
            seed=self.seed,
            max_fault_warnings=self.max_fault_warnings,
        )

    train_key = "sources"

    def _build_train(self) -> MixtureStream:
        train = self._train_stream()
        self.resolve_shards()
        return train
