"""Image embeddings computed once and reused: fine-tuning with a frozen image encoder.

With ``module.freeze_image_encoder=true`` the encoder's output for an image never changes, so
``SamModule.embed`` asks this cache first (by the batch's ``image_id``) and runs the encoder
only on the images it has not seen; the interactive simulation then runs on the cached
embeddings as on fresh ones. Many epochs of many masks per image cost one encoder pass.

Layout (one file per image, so that any number of ranks and processes write and read at once)::

    <dir>/<namespace>/meta.json                 what the namespace was computed from
    <dir>/<namespace>/<h[:2]>/<h>.pt            h = sha256(image key); torch.save of
        {"key": str, "embedding": (C, h, w) bf16, "fingerprint": (4,) float64}

*namespace* = sha256 of everything that decides the embedding besides the image key: the
encoder's weights, parameter names, shapes and dtypes and its class; the input size S; the
normalisation (PIXEL_MEAN / PIXEL_STD); the data's pre-processing that changes pixels
(``fast_jpeg``); the storage dtype; the format version. A different encoder, image size or
decoding never sees another's entries. *fingerprint*: four sums of the normalised input image
(plain, squared, against two fixed random patterns): an entry whose image is not the one
in the batch under the same key (an augmentation, data regenerated under the same keys, two
sources with a common key) is refused with an error naming the key, never used.

Entries are written with `segany.utils.io.atomic_write` (a killed writer leaves only a
``.tmp-*`` file beside, never a partial entry) and read memory-mapped (``torch.load(mmap=True,
weights_only=True)``). Each rank writes only the images of its own batches; two ranks writing
the same key write the same bytes, and the rename is atomic. A damaged entry (not written by
this module) is warned about, recomputed and replaced.

Augmentations that change the image cannot be cached: ``data.flip`` and ``data.jitter`` (LSJ)
are refused when the cache is on (`check_augmentations`). Allowed: everything that leaves the
image as it is (mask sampling, ``max_masks``, mask filters, every prompting option).

The embedding the decoder gets is the stored one (rounded to ``dtype``) also on the step that
computes it, so a run sees the same embeddings in every epoch. The trainer's precision is not
part of the namespace: entries computed under bf16-mixed are read by a 32-true run with the same
weights (they differ by the encoder's mixed-precision error). A killed writer's ``.tmp-*`` file
is never read; delete such files at will. Not supported: FSDP (a sharded encoder's forward is
collective; ranks with different hits would wait on each other).
Hand-written: no maintained library caches per-sample model outputs on disk with this keying.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from segany.modeling.constants import PIXEL_MEAN, PIXEL_STD
from segany.utils.io import atomic_torch_save, atomic_write_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # the precision words (segany/utils/precision.py)


def encoder_digest(encoder: nn.Module) -> str:
    """sha256 over the encoder's class, and every state-dict entry's name, shape, dtype and bytes."""
    h = hashlib.sha256(f"{type(encoder).__module__}.{type(encoder).__qualname__}".encode())
    for name, t in sorted(encoder.state_dict().items()):
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_PATTERNS: dict = {}


def image_fingerprint(images: Tensor) -> Tensor:
    """(B, 3, S, S) -> (B, 4) float64 on the CPU: sum, sum of squares, and sums against two fixed
    N(0, 1) patterns (seeded by S). A flip, crop or re-decoding moves the pattern sums by about
    the image's L2 norm; the same image on another device by rounding only."""
    S = images.shape[-1]
    key = (S, images.device)
    if key not in _PATTERNS:
        g = torch.Generator().manual_seed(S)
        _PATTERNS[key] = torch.randn(2, 1, S, S, generator=g, dtype=torch.float64).to(images.device)
    x = images.detach().to(torch.float64)
    p = _PATTERNS[key]
    parts = [x.sum((1, 2, 3)), (x * x).sum((1, 2, 3)), (x * p[0]).sum((1, 2, 3)), (x * p[1]).sum((1, 2, 3))]
    return torch.stack(parts, 1).cpu()


def same_image(a: Tensor, b: Tensor) -> bool:
    """Fingerprints (4,) of the same image: every sum within 1e-4 x the image's L2 norm (~1.7e3 for
    a normalised 1024 px image: a few pixels one level off pass, float64 summation order is
    ~1e-9); a flip or crop moves a pattern sum by about the norm itself."""
    tol = 1e-4 * float(max(a[1], b[1])) ** 0.5 + 1e-6
    return bool((a - b).abs().max() <= tol)


class EmbeddingCache:
    """``module.embedding_cache`` (configs/module/sam.yaml). enabled: off by default;
    dir: the cache root (shared by runs: each encoder / pre-processing has its own namespace
    below it); dtype: "bf16" (default; 2 MB per image at 1024 px) or "fp32"."""

    def __init__(self, enabled: bool = False, dir: Optional[str] = None, dtype: str = "bf16"):
        self.enabled = bool(enabled)
        if dtype not in DTYPES:
            raise ValueError(f"module.embedding_cache.dtype={dtype!r}: one of {list(DTYPES)}")
        self.dtype = DTYPES[dtype]
        self.dtype_name = dtype
        if self.enabled and not dir:
            raise ValueError("module.embedding_cache.dir is not set (needed with module.embedding_cache.enabled=true)")
        self.dir = None if dir is None else os.fspath(dir)
        self.data_settings: dict = {}  # pixel-changing data settings (fast_jpeg), from check_augmentations
        self._encoder_digest: Optional[str] = None
        self._namespaces: dict = {}  # S -> namespace directory
        self.hits = 0
        self.misses = 0

    # ------------------------------------------------------------------ configuration
    def check_augmentations(self, datamodule) -> None:
        """Refuse a datamodule whose training samples change the image (flip, jitter), naming the
        config keys; remember its pixel-changing settings (fast_jpeg) for the namespace. Looks at
        the datamodule's SampleConfig ``cfg`` and, for a mixture, each source's."""
        found, cfgs = [], []
        top = getattr(datamodule, "cfg", None)
        if top is not None:
            cfgs.append(("data.", top))
        ds = getattr(datamodule, "train_dataset", None)
        for name, child in zip(getattr(ds, "names", ()), getattr(ds, "children", ())):
            cfgs.append((f"data.sources.{name}.", child.cfg))
        for where, c in cfgs:
            if getattr(c, "flip", 0.0):
                found.append(f"{where}flip={c.flip}")
            if getattr(c, "jitter", None) is not None:
                found.append(f"{where}jitter=true (scale {list(c.jitter)})")
        if found:
            raise ValueError(
                f"module.embedding_cache.enabled=true: image-changing augmentation {', '.join(found)} "
                "would make every cached embedding stale; turn it off or turn the cache off"
            )
        if top is not None and hasattr(top, "fast_jpeg"):
            self.data_settings = {"fast_jpeg": bool(top.fast_jpeg)}

    def namespace(self, encoder: nn.Module, img_size: int) -> str:
        """The directory of this encoder's entries at input size S (created, with meta.json)."""
        if img_size in self._namespaces:
            return self._namespaces[img_size]
        if self._encoder_digest is None:
            self._encoder_digest = encoder_digest(encoder)
        meta = {
            "version": FORMAT_VERSION,
            "encoder": self._encoder_digest,
            "img_size": int(img_size),
            "pixel_mean": list(PIXEL_MEAN),
            "pixel_std": list(PIXEL_STD),
            "dtype": self.dtype_name,
            "data": self.data_settings,
        }
        digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]
        path = os.path.join(self.dir, digest)
        if not os.path.isfile(os.path.join(path, "meta.json")):
            atomic_write_json(os.path.join(path, "meta.json"), meta, indent=1)
        log.info("embedding cache %s (S=%d, encoder %s...)", path, img_size, self._encoder_digest[:12])
        self._namespaces[img_size] = path
        return path

    @staticmethod
    def entry_path(namespace: str, key: str) -> str:
        h = hashlib.sha256(key.encode()).hexdigest()[:40]
        return os.path.join(namespace, h[:2], f"{h}.pt")

    # ------------------------------------------------------------------ entries
    def load(self, namespace: str, key: str) -> Optional[dict]:
        """The entry of `key` (its tensors memory-mapped), or None if absent or damaged."""
        path = self.entry_path(namespace, key)
        if not os.path.isfile(path):
            return None
        try:
            entry = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            if not isinstance(entry, dict) or not {"key", "embedding", "fingerprint"} <= set(entry):
                raise ValueError("not a cache entry")
        except Exception as exc:  # damaged by something else than this module: recompute it
            log.warning("embedding cache: %s (key %r) is unreadable (%s); recomputing it", path, key, exc)
            return None
        if entry["key"] != key:
            raise ValueError(f"embedding cache: {path} holds key {entry['key']!r}, not {key!r} (hash collision)")
        return entry

    def store(self, namespace: str, key: str, embedding: Tensor, fingerprint: Tensor) -> None:
        """Write one entry atomically; embedding (C, h, w) already in the storage dtype."""
        entry = {"key": key, "embedding": embedding.detach().cpu().clone(), "fingerprint": fingerprint.clone()}
        atomic_torch_save(entry, self.entry_path(namespace, key))

    # ------------------------------------------------------------------ the lookup
    def embed(self, encoder: nn.Module, images: Tensor, keys: Sequence[str]) -> Tensor:
        """(B, 3, S, S) images with their keys -> (B, C, S/16, S/16) float32 embeddings on the
        images' device: the stored ones, the encoder (no grad) on the others, which are stored.
        hits / misses count distinct images per call."""
        if len(keys) != images.shape[0]:
            raise ValueError(f"embedding cache: {len(keys)} image keys for {images.shape[0]} images")
        ns = self.namespace(encoder, images.shape[-1])
        prints = image_fingerprint(images)  # (B, 4)
        out: dict = {}  # key -> (C, h, w) in the storage dtype
        first: dict = {}  # key -> its first row in the batch (a batch may hold an image twice)
        for i, key in enumerate(keys):
            if key in first:
                entry_print, where = prints[first[key]], f"row {first[key]} of the same batch"
            else:
                first[key] = i
                entry = self.load(ns, key)
                if entry is None:
                    continue
                out[key] = entry["embedding"]
                entry_print, where = entry["fingerprint"], self.entry_path(ns, key)
            if not same_image(entry_print, prints[i]):
                raise ValueError(
                    f"embedding cache: image {key!r} is not the image cached under that key in {where} "
                    "(an augmentation that changes the image, data regenerated under the same keys, or two "
                    "images with one key); set module.embedding_cache.dir to a new folder or delete that one"
                )
        miss = [k for k in first if k not in out]
        if miss:
            rows = [first[k] for k in miss]
            with torch.no_grad():
                fresh = encoder(images[rows]).to(self.dtype)
            for k, i, e in zip(miss, rows, fresh):
                self.store(ns, k, e, prints[i])
                out[k] = e
        self.hits += len(first) - len(miss)
        self.misses += len(miss)
        return torch.stack([out[k].to(images.device, non_blocking=True) for k in keys]).float()
