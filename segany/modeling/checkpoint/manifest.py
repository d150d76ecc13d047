"""Checkpoint manifests: the size and a hash of every file of a checkpoint, written after the
checkpoint itself, so that a reader notices a damaged one (a file system that kept the rename
but not the data, a bit flip, a half-copied run directory) before it reads garbage.

Where the manifest lives:
  * a single file ``last.ckpt``: ``last.ckpt.manifest.json`` beside it;
  * a torch.distributed.checkpoint directory: ``manifest.json`` inside it, one entry per file
    (each rank's ``*.distcp`` shard, ``.metadata``, Lightning's ``meta.pt``); it is written into
    the temporary directory before the directory swap, so it arrives with the checkpoint.

    {"format": 1, "algorithm": "xxh3_128", "files": {"last.ckpt": {"size": 123, "hash": "9f.."}}}

`save_with_manifest(obj, path)` torch.saves a file atomically (segany.utils.io) and hashes the
bytes on their way to the disk; `write_manifest(path)` hashes the files of a directory already
written. `problems(path)` / `verify_checkpoint(path)` re-read the files and compare. A checkpoint with no
manifest (written by an older segany, by another tool or by hand) is accepted unverified:
`verify_checkpoint` returns False and the caller says so.

Hash: xxhash's xxh3_128 when the package is installed (about 10 GB/s on one core, so a
multi-GB checkpoint is hashed at disk speed), else hashlib's sha256 (about 1.5 GB/s with the
CPU's SHA instructions; blake2b measured 0.8 GB/s). The manifest names its algorithm; a reader
lacking it checks the sizes only, and logs that. The streaming loop is hand-written because
hashlib.file_digest needs Python 3.11 and the project supports 3.10.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Dict, List, Optional

from segany.modeling.checkpoint.trust import CheckpointError
from segany.utils.io import atomic_write, atomic_write_json, remove

try:
    import xxhash
except ImportError:  # optional: sha256 then
    xxhash = None

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"  # inside a checkpoint directory
SIDECAR = ".manifest.json"  # beside a checkpoint file: <name>.manifest.json
ALGORITHM = "xxh3_128" if xxhash is not None else "sha256"
_CHUNK = 1 << 24  # 16 MiB reads


def _hasher(algorithm: str):
    """A new hash object of `algorithm`, or None when this Python cannot compute it."""
    if algorithm == "xxh3_128":
        return xxhash.xxh3_128() if xxhash is not None else None
    return hashlib.new(algorithm) if algorithm in ("sha256", "blake2b") else None


def manifest_path(path) -> str:
    """Where the manifest of checkpoint `path` (a file or a directory) is."""
    path = os.fspath(path)
    return os.path.join(path, MANIFEST) if os.path.isdir(path) else path + SIDECAR


def hash_file(path, algorithm: str = ALGORITHM) -> str:
    """The hex digest of a file's bytes, read in 16 MiB chunks."""
    h = _hasher(algorithm)
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


class _HashingWriter:
    """The file torch.save writes into, hashing and counting the bytes on their way
    (torch.save calls only `write` and `flush` on a file object)."""

    def __init__(self, f):
        self.f, self.hash, self.size = f, _hasher(ALGORITHM), 0

    def write(self, data) -> int:
        self.hash.update(data)
        self.size += memoryview(data).nbytes
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _write(path, files: Dict[str, dict]) -> None:
    atomic_write_json(manifest_path(path), {"format": FORMAT, "algorithm": ALGORITHM, "files": files}, indent=1)


def save_with_manifest(obj, path) -> None:
    """torch.save(obj) to file `path` atomically, then its manifest beside it. The old
    manifest goes just before the new file takes the name: a kill between the steps leaves a
    checkpoint without a manifest (accepted, unverified), never a good one refused."""
    import torch

    with atomic_write(path, "wb") as f:
        out = _HashingWriter(f)
        torch.save(obj, out)
        remove(manifest_path(path))
    _write(path, {os.path.basename(os.fspath(path)): {"size": out.size, "hash": out.hash.hexdigest()}})


def write_manifest(directory) -> None:
    """The manifest of a checkpoint directory already written: one entry per file in it."""
    directory = os.fspath(directory)
    names = sorted(n for n in os.listdir(directory) if n != MANIFEST and os.path.isfile(os.path.join(directory, n)))
    files = {}
    for n in names:
        p = os.path.join(directory, n)
        files[n] = {"size": os.path.getsize(p), "hash": hash_file(p)}
    _write(directory, files)


def problems(path) -> Optional[List[str]]:
    """How checkpoint `path` differs from its manifest: [] when it matches, None when it has
    no manifest; a manifest that cannot be read is itself a problem."""
    path = os.fspath(path)
    mpath = manifest_path(path)
    if not os.path.isfile(mpath):
        return None
    try:
        with open(mpath) as f:
            manifest = json.load(f)
        algorithm, files = manifest["algorithm"], manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict) or not files:
            raise ValueError(f"format {manifest.get('format')!r} with {type(files).__name__} files")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"its manifest {mpath} cannot be read ({type(e).__name__}: {e})"]
    if os.path.isdir(path):
        expected = {os.path.join(path, name): entry for name, entry in files.items()}
    elif len(files) == 1:  # a file's manifest has its one entry (whatever the file is now called)
        expected = {path: next(iter(files.values()))}
    else:
        return [f"its manifest {mpath} lists {len(files)} files for a single-file checkpoint"]
    if _hasher(algorithm) is None:
        log.warning("%s: manifest hash %s not available here (pip install xxhash): sizes checked only", path, algorithm)
    found = []
    for file, entry in expected.items():
        if not os.path.isfile(file):
            found.append(f"{file}: missing (the manifest lists {entry['size']} bytes)")
        elif (size := os.path.getsize(file)) != entry["size"]:
            found.append(f"{file}: {size} bytes, the manifest says {entry['size']}")
        elif _hasher(algorithm) is not None and (digest := hash_file(file, algorithm)) != entry["hash"]:
            found.append(f"{file}: {algorithm} {digest}, the manifest says {entry['hash']}")
    return found


def verify_checkpoint(path) -> bool:
    """True when checkpoint `path` matches its manifest, False when it has none (accepted
    unverified); raises CheckpointError naming each file that differs and how."""
    found = problems(path)
    if found:
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} does not match its manifest ({manifest_path(path)}): "
            + "; ".join(found)
            + ". It changed after it was written (a damaged disk or copy, a file system that lost data): "
            "use an earlier checkpoint"
        )
    if found is None:
        log.debug("%s has no manifest: read unverified", os.fspath(path))
    return found is not None
