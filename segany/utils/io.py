"""Atomic writes: a kill (SIGKILL, node failure, time limit) at any moment leaves either the
previous file or the complete new one under the target name, never half a file.

- `atomic_write(path, mode)`: yields an open temporary file ``<path>.tmp-<pid>-<random>`` beside
  the target; on a normal exit it is flushed, fsynced, renamed over the target (`os.replace`,
  atomic on POSIX file systems) and the directory is fsynced (so that the rename survives a power
  loss). On an exception the temporary file is removed and the target is untouched.
  `atomic_write_json` and `atomic_torch_save` are built on it.
- `replace_dir(tmp, path)`: the same for a directory (a torch distributed checkpoint):
  ``path`` -> ``path.old``, ``tmp`` -> ``path``, delete ``path.old``. Between the two renames only
  ``path.old`` exists; `segany.training.checkpointing.resolve_checkpoint` falls back to it.

Hand-written because the standard library has only the atomic step (`os.replace`); the temporary
file, its fsync and the directory fsync around it are this module's.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from contextlib import contextmanager
from typing import IO, Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]
TMP_MARK = ".tmp-"  # temporary files are "<target><TMP_MARK>..."; a killed writer leaves one behind
OLD_SUFFIX = ".old"  # replace_dir: the previous directory while the new one is renamed into place


def fsync_dir(path: PathLike) -> None:
    """fsync a directory, so that renames inside it are on disk; a no-op where the OS cannot."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: PathLike, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """``with atomic_write(path, "w") as f: f.write(...)``: `path` gets the content only when the
    block completes (see the module docstring). mode: "wb" or "w"; open_kwargs go to `open`."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', not {mode!r}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    # not tempfile.mkstemp: that creates the file 0600; the target gets the usual 0666 & ~umask
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        f = open(fd, mode, **open_kwargs)
    except BaseException:
        os.close(fd)
        os.remove(tmp)
        raise
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(directory)


def atomic_write_json(path: PathLike, obj, **dump_kwargs) -> None:
    """json.dump(obj) to `path` atomically."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, **dump_kwargs)


def read_json(path: PathLike, what: str = "file"):
    """json.load(path); a missing file or invalid JSON raises an error naming `what` and the path."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    with open(path) as f:
        try:
            return json.load(f)
        except ValueError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from None


def atomic_torch_save(obj, path: PathLike) -> None:
    """torch.save(obj) to `path` atomically."""
    import torch

    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def remove(path: PathLike) -> None:
    """Delete a file or a directory tree, if it exists."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def replace_dir(tmp: PathLike, path: PathLike) -> None:
    """Make directory `tmp` the new `path`; the old `path` survives as ``path.old`` until the new
    one is in place."""
    path = os.path.normpath(os.fspath(path))
    old = path + OLD_SUFFIX
    if os.path.lexists(path):
        remove(old)
        os.replace(path, old)
    # else: an earlier swap was interrupted, and `old` stays the fallback until `tmp` is in place
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    remove(old)
