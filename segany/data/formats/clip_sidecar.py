"""CLIP embeddings of a shard's masks, in a sidecar file beside the shard.

    shards/train-000000.tar           the SA-1B-format shard
    shards/train-000000.clip.npz      ids (A,) int64 annotation ids, embeddings (A, D) float16,
                                      meta: a JSON string (CLIP model, crop settings, seed)

written by `python -m segany.engine.clip_embeddings`, read by the datamodules
(`data.clip_sidecar=.clip.npz`). Only masks that got an embedding are listed (area above the
minimum); a mask not listed has no text prompt. Plain numpy arrays, read with
allow_pickle=False: a sidecar is data, never code.
"""

from __future__ import annotations

import json
import os
from typing import IO, Union

import numpy as np

SUFFIX = ".clip.npz"


def sidecar_path(shard: str, suffix: str = SUFFIX) -> str:
    """`dir/train-000000.tar` -> `dir/train-000000.clip.npz`."""
    return os.path.splitext(shard)[0] + suffix


def write(f: Union[str, IO], ids: np.ndarray, embeddings: np.ndarray, meta: dict) -> None:
    ids = np.asarray(ids, np.int64).reshape(-1)
    embeddings = np.asarray(embeddings, np.float16)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(ids):
        raise ValueError(f"clip sidecar: {len(ids)} ids but embeddings of shape {embeddings.shape}")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("clip sidecar: annotation ids repeat")
    np.savez(f, ids=ids, embeddings=embeddings, meta=np.array(json.dumps(meta)))


def read(path: str) -> tuple:
    """-> ids (A,) int64, embeddings (A, D) float32, meta dict. A bad file raises naming it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            ids, emb, meta = z["ids"], z["embeddings"].astype(np.float32), json.loads(str(z["meta"]))
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"clip sidecar {path!r} is unreadable (expected ids, embeddings, meta): {e}") from e
    if emb.ndim != 2 or emb.shape[0] != ids.shape[0]:
        raise ValueError(f"clip sidecar {path!r}: {ids.shape[0]} ids but embeddings of shape {emb.shape}")
    return ids.astype(np.int64), emb, meta


def lookup(ids: np.ndarray, embeddings: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Rows of `embeddings` for the annotation ids `wanted` (W,) -> (W, D) float32, NaN rows
    where an id has no embedding."""
    out = np.full((len(wanted), embeddings.shape[1]), np.nan, np.float32)
    if len(ids) == 0 or len(wanted) == 0:
        return out
    order = np.argsort(ids)
    pos = np.searchsorted(ids[order], wanted)
    pos = np.minimum(pos, len(ids) - 1)
    hit = ids[order][pos] == wanted
    out[hit] = embeddings[order[pos[hit]]]
    return out
