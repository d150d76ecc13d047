"""Read the members of a tar stream one by one, with their byte offsets.

Written for streaming shards as published (no index, no unpacking) and for surviving
damage, which `tarfile` in stream mode does not report: it treats a header cut short,
a damaged header or a missing end-of-archive as a normal end and silently drops the rest
of the shard. Here:
- a member or header cut short (EOF before the end-of-archive block) raises TarTruncated;
- a header whose checksum fails, or whose size field holds no size, is reported through
  `on_corrupt(offset, nbytes)` and reading resumes at the next block that is a valid header;
  so is a pax extended header whose records do not parse (its member keeps the plain
  header's name and size);
- reads ask for at most 16 MiB at a time, so a size field that lies costs no more memory
  than the bytes actually there;
- every member carries the offset of its first header block and the offset just past it,
  so that a reader can later resume exactly there (seek, or skip bytes on a pipe).
Formats: ustar (name prefix), GNU long names ('L'), pax extended headers ('x': path,
size). Non-regular members (directories, links, global headers) are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

BLOCK = 512


class TarTruncated(Exception):
    """The stream ended inside a member, inside a header, or before the end-of-archive block."""

    def __init__(self, message: str, name: Optional[str] = None):
        super().__init__(message)
        self.name = name


@dataclass
class TarMember:
    name: str
    data: bytes
    offset: int  # first header block of this member (its extended headers included)
    next_offset: int  # just past its data padding: where the next member starts


_CHUNK = 1 << 24  # a read asks for at most this much: a damaged size field must not allocate gigabytes


def _read_exact(f, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        more = f.read(min(n - got, _CHUNK))
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _cstr(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _number(field: bytes) -> int:
    if field and field[0] in (0x80, 0xFF):  # GNU base-256 (any other high byte is damage, as in tarfile)
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[0] == 0xFF else value
    text = field.split(b"\0", 1)[0].strip(b" ")
    return int(text, 8) if text else 0


def _header_ok(block: bytes) -> bool:
    """The checksum matches and the size field holds a size (a header can pass its checksum and
    still be damaged: several flipped bytes, or a writer's bug)."""
    try:
        stored = _number(block[148:156])
        if _number(block[124:136]) < 0:
            return False
    except ValueError:
        return False
    unsigned = sum(block[:148]) + 256 + sum(block[156:])
    signed = unsigned - 2 * sum(b for b in block[:148] + block[156:] if b > 127)
    return stored in (unsigned, signed)


def _pax_records(data: bytes) -> dict:
    out, pos = {}, 0
    while pos < len(data):
        sp = data.index(b" ", pos)
        length = int(data[pos:sp])
        if length <= sp - pos or pos + length > len(data):  # would not move on, or runs past the data
            raise ValueError(f"pax record length {length} at {pos}")
        key, _, value = data[sp + 1 : pos + length - 1].partition(b"=")
        out[key.decode()] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def iter_members(f, start: int = 0, on_corrupt: Optional[Callable[[int, int], None]] = None) -> Iterator[TarMember]:
    """Yield the regular members of the tar stream `f`, positioned at byte `start` (a member
    boundary). Raises TarTruncated when the stream ends before the end-of-archive block."""
    pos = start
    member_start = None  # offset of the first (extended) header of the current member
    long_name = None
    pax: dict = {}
    while True:
        block = _read_exact(f, BLOCK)
        if len(block) < BLOCK:
            raise TarTruncated(f"stream ends at byte {pos + len(block)} without end-of-archive", long_name)
        if block == b"\0" * BLOCK:
            return
        if not _header_ok(block):
            bad = pos
            while True:  # resynchronise on the next valid header block
                pos += BLOCK
                block = _read_exact(f, BLOCK)
                if len(block) < BLOCK:
                    if on_corrupt is not None:
                        on_corrupt(bad, pos - bad)
                    raise TarTruncated(f"stream ends at byte {pos + len(block)} after a damaged header at {bad}")
                if block == b"\0" * BLOCK or _header_ok(block):
                    break
            if on_corrupt is not None:
                on_corrupt(bad, pos - bad)
            member_start, long_name, pax = None, None, {}
            if block == b"\0" * BLOCK:
                return
        if member_start is None:
            member_start = pos
        name = _cstr(block[0:100])
        if block[257:263] == b"ustar\0" and block[345] != 0:
            name = _cstr(block[345:500]) + "/" + name
        kind = block[156:157]
        size = _number(block[124:136])
        name = pax.get("path", long_name or name)
        if kind in (b"0", b"\0", b"7") and "size" in pax:
            size = int(pax["size"])
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        data = _read_exact(f, padded)
        if len(data) < padded:
            raise TarTruncated(f"member {name!r} cut short at byte {pos + BLOCK + len(data)}", name)
        data = data[:size]
        pos += BLOCK + padded
        if kind == b"L":
            long_name = _cstr(data)
            continue
        if kind == b"x":
            try:
                pax = _pax_records(data)
                if "size" in pax and not (pax["size"].isascii() and pax["size"].isdigit()):
                    raise ValueError(f"pax size {pax['size']!r}")
            except ValueError:  # damaged extended header: keep the plain header's fields
                pax = {}
                if on_corrupt is not None:
                    on_corrupt(member_start, pos - member_start)
            continue
        if kind in (b"0", b"\0", b"7"):
            yield TarMember(name, data, member_start, pos)
        member_start, long_name, pax = None, None, {}
