"""Shard lists: expansion, checks at start, opening at a byte offset, splitting by rank
and worker (rank / world size: `segany.utils.dist.topology`).

Shard specs follow webdataset: a string with brace ranges (`sa_{000000..000999}.tar`),
several joined by `::`, or a list of such strings. Local paths may also use glob
wildcards. URLs: local paths, `file://`, `pipe:<command>` (webdataset's gopen), and any
protocol fsspec knows (`s3://`, `gs://`, `memory://`, ...; its backend must be installed).
"""

from __future__ import annotations

import glob
import os
from typing import Sequence, Union
from urllib.parse import urlparse
from urllib.request import url2pathname

from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls

_SKIP_CHUNK = 1 << 20


def _scheme(url: str) -> str:
    s = urlparse(url).scheme
    return "" if len(s) <= 1 else s  # "C:" is a drive letter, not a scheme


def _local_path(url: str):
    s = _scheme(url)
    if s == "":
        return os.path.expanduser(url)
    if s == "file":
        return url2pathname(urlparse(url).path)
    return None


def expand(spec: Union[str, Sequence[str]]) -> list[str]:
    """Brace-expand (and glob, for local paths) a shard spec into a list of URLs."""
    if spec is None:
        return []
    specs = [spec] if isinstance(spec, str) else [str(s) for s in spec]
    urls: list[str] = []
    for s in specs:
        for url in expand_urls(s):
            path = _local_path(url)
            if path is not None and glob.has_magic(path):
                urls.extend(sorted(glob.glob(path)))
            else:
                urls.append(url)
    return urls


def _fsspec_fs(url: str):
    try:
        import fsspec

        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError):  # no fsspec, or no backend for this protocol
        return None


def resolve(spec, check: bool = True, what: str = "shards") -> list[str]:
    """Expand `spec`; fail now, with the offending paths, if it matches nothing or (check)
    a local or fsspec shard does not exist or cannot be read. pipe: URLs are not checked."""
    urls = expand(spec)
    if not urls:
        raise FileNotFoundError(f"{what}: {spec!r} matches no shard")
    if not check:
        return urls
    missing, unreadable = [], []
    for url in urls:
        path = _local_path(url)
        if path is not None:
            if not os.path.exists(path):
                missing.append(url)
            elif not os.path.isfile(path) or not os.access(path, os.R_OK):
                unreadable.append(url)
        elif _scheme(url) not in ("pipe", "http", "https"):
            found = _fsspec_fs(url)
            if found is not None and not found[0].exists(found[1]):
                missing.append(url)
    if missing or unreadable:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unreadable:
            parts.append(f"{len(unreadable)} unreadable (e.g. {', '.join(unreadable[:3])})")
        raise FileNotFoundError(f"{what}: of {len(urls)} shards from {spec!r}, " + "; ".join(parts))
    return urls


def subset(urls: list[str], num_shards, what: str = "num_shards") -> list[str]:
    """The first `num_shards` of `urls` in listing order (brace ranges expand in order, globs
    sorted): a fixed, reproducible training subset (SA-1B: ~11k images per shard, so 9 / 91 /
    1000 shards are the paper's 0.1M / 1M / 11M images). None: all of them."""
    if num_shards is None:
        return list(urls)
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"{what}={num_shards!r}: a positive number of shards, or null for all")
    if num_shards > len(urls):
        raise ValueError(f"{what}={num_shards}: the shard list has only {len(urls)} shards")
    return list(urls[:num_shards])


def open_shard(url: str, offset: int = 0):
    """Binary stream of the shard positioned at byte `offset` (seek, or read and discard)."""
    s = _scheme(url)
    stream = None
    if s not in ("", "file", "pipe"):
        found = _fsspec_fs(url)
        if found is not None:
            stream = found[0].open(found[1], "rb")
    if stream is None:
        stream = gopen(url, "rb")
    if offset:
        try:
            if not stream.seekable():
                raise OSError
            stream.seek(offset)
        except (OSError, AttributeError, ValueError):
            left = offset
            while left > 0:
                chunk = stream.read(min(left, _SKIP_CHUNK))
                if not chunk:
                    break
                left -= len(chunk)
    return stream


def close_quietly(stream) -> None:
    try:
        stream.close()
    except Exception:  # a pipe closed early exits non-zero; nothing to report
        pass


def assign(n_shards: int, slot: int, n_slots: int, cover: bool = False) -> list[int]:
    """Shard indices of slot `slot` of `n_slots` (slot = rank * workers + worker): round
    robin, so slots are disjoint and together cover every shard. With cover=True a slot
    that would get none (fewer shards than slots) shares shard slot % n_shards."""
    own = list(range(slot, n_shards, n_slots))
    if not own and cover and n_shards:
        own = [slot % n_shards]
    return own
