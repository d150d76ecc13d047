"""Shard lists: expansion, checks at start, opening at a byte offset, splitting by rank
and worker (rank / world size: `segany.utils.dist.topology`).

A shard spec is a string, several joined by `::`, or a list of such strings. Each part is
  - a directory: every `*.tar` directly in it, sorted by name
        data.train_shards=/datasets/sa1b
  - a list file (`.txt`, `.list`, `.shards`): one shard per line; blank lines and `#`
    comments ignored; relative paths are relative to the list file's directory
        data.train_shards=/datasets/sa1b/train.txt
  - a brace range or set, expanded by webdataset (`sa_{000000..000999}.tar`). On a command
    line the braces need two quotes: single for bash, double for Hydra's grammar
        'data.train_shards="/datasets/sa1b/sa_{000000..000999}.tar"'
  - a local path with glob wildcards (`sa_*.tar`, sorted), a plain path, `file://`,
    `pipe:<command>` (webdataset's gopen), or any URL fsspec knows (`s3://`, `gs://`,
    `memory://`, ...; its backend must be installed).
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


LIST_SUFFIXES = (".txt", ".list", ".shards")


def _describe(spec) -> str:
    """repr of a spec for messages, shortened when it is a long list."""
    if isinstance(spec, (list, tuple)) and len(spec) > 4:
        return f"[{spec[0]!r}, {spec[1]!r}, ... {spec[-1]!r}] ({len(spec)} entries)"
    return repr(spec)


def _list_file(path: str, what: str) -> list[str]:
    """Entries of a shard list file: one per line, `#` comments and blank lines dropped,
    relative paths made relative to the file's directory (URLs are kept as they are)."""
    if not os.path.isfile(path):
        kind = "is a directory" if os.path.isdir(path) else "does not exist"
        raise FileNotFoundError(f"{what}: shard list file {path} {kind}")
    base = os.path.dirname(os.path.abspath(path))
    entries = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if _scheme(line) == "" and not os.path.isabs(os.path.expanduser(line)):
                line = os.path.join(base, line)
            entries.append(line)
    if not entries:
        raise FileNotFoundError(f"{what}: shard list file {path} lists no shard (only blank or # lines)")
    return entries


def _directory(path: str, what: str) -> list[str]:
    found = sorted(glob.glob(os.path.join(glob.escape(path), "*.tar")))
    if not found:
        raise FileNotFoundError(f"{what}: directory {path} holds no *.tar shard")
    return found


def _expand_url(url: str, what: str, in_list: bool) -> list[str]:
    path = _local_path(url)
    if path is None:
        return [url]
    if os.path.isdir(path) and not path.endswith(".tar"):  # a directory named *.tar is a bad shard
        return _directory(path, what)
    if path.endswith(LIST_SUFFIXES):
        if in_list:
            raise ValueError(f"{what}: a shard list file cannot name another list file ({url})")
        return [u for entry in _list_file(path, what) for u in _expand_part(entry, what, in_list=True)]
    if glob.has_magic(path):
        return sorted(glob.glob(path))
    return [url]


def _expand_part(spec: str, what: str, in_list: bool = False) -> list[str]:
    # expand_urls: split on "::", brace ranges / sets (and WDS_ environment variables)
    return [u for url in expand_urls(spec) for u in _expand_url(url, what, in_list)]


def expand(spec: Union[str, Sequence[str]], what: str = "shards") -> list[str]:
    """A shard spec (module docstring) -> the list of shard URLs, in order."""
    if spec is None:
        return []
    specs = [spec] if isinstance(spec, str) else [str(s) for s in spec]
    return [u for s in specs for u in _expand_part(s, what)]


def summary(urls: Sequence[str]) -> dict:
    """{count, first, last} of a resolved shard list: what a run logs and records."""
    urls = list(urls)
    return {"count": len(urls), "first": urls[0] if urls else None, "last": urls[-1] if urls else None}


def _fsspec_fs(url: str):
    try:
        import fsspec

        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError):  # no fsspec, or no backend for this protocol
        return None


def resolve(spec, check: bool = True, what: str = "shards") -> list[str]:
    """Expand `spec`; fail now if it matches nothing or (check) a shard is missing or unreadable."""
    urls = expand(spec, what)
    if not urls:
        raise FileNotFoundError(f"{what}: {_describe(spec)} matches no shard")
    if check:
        check_readable(urls, what, spec)
    return urls


def check_readable(urls: Sequence[str], what: str = "shards", spec=None) -> None:
    """Fail, naming the offending shards (and the spec they came from), when a local or fsspec
    shard does not exist or cannot be read. pipe: and http(s) URLs are not checked."""
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
        source = _describe(urls if spec is None else spec)
        raise FileNotFoundError(f"{what}: of {len(urls)} shards from {source}, " + "; ".join(parts))


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
