"""Shard fuzzing: SA-1B tars damaged at random (fixed seeds) and read through the training
data's own path (SA1BDataModule -> read_pairs -> iter_members -> sa1b_record -> make_sample
-> collate, faults counted by segany.data.faults), each read under a deadline.

Damage, one kind per case, aimed at one part of a 6-sample shard (jpg + json per key; two
images share a size, as most SA-1B images do, so that a wrong pairing would pass the size check):
  jpeg        1-3 bytes of one sample's JPEG flipped (every other seed in its first 700 bytes:
              the tables and frame header, where a flip is seen more often)
  json        1-3 bytes of one sample's json flipped, outside its RLE counts strings
  rle         1-2 bytes inside one RLE counts string flipped
  header      1-2 bytes of one member's tar header flipped in its name, size or checksum field
              (the checksum no longer matches)
  header_lie  the same in the name or size field, the checksum rewritten to match (a header
              that parses but lies); on pax shards also flips in the pax record of the path
  truncate    the shard cut mid-header, mid-member, or in the end-of-archive blocks

What the reader can know, and so what is asserted (`check`):
  1. It never raises and never hangs (each read runs in a thread with a deadline).
  2. Every key arrives at most once, and only original keys arrive.
  3. Every sample whose bytes were not touched, and whose members were not swallowed by a
     lying header, arrives with its original content: image pixels (the stored JPEG as cv2
     decodes it), every mask (the originals, padded), every annotation id. A touched sample
     that arrives differs only where the format carries no check: JPEG pixels (no checksum
     in JPEG), annotation ids and other unchecked json numbers, masks whose RLE still sums
     to h*w. Everything the reader does check (json syntax and fields, RLE validity, image
     size against the json, tar checksums) refuses the sample instead.
  4. Every lost sample is counted: either a fault names its key (bad_image, bad_json,
     orphan, duplicate_member, truncated_tar, ...), or its members lie in bytes the reader
     reports it skipped (a corrupt_tar fault's byte range, the rest of a shard after
     truncated_tar), or in the data of a member whose header lied about its size (the reader
     read them as that member's bytes and cannot know they were members; that member's own
     sample is then counted). Per-sample faults (bad_image, bad_json, ...) name only lost
     keys, never one that arrived; sample_error (a decoding bug) and shard_error never occur.
  5. The counts add up: the fault counts carried by the batches are at least the distinct
     (kind, key) warnings, and for the kinds whose damage the reader can localise exactly:
     jpeg / json / rle: lost == the damaged sample or nothing, counted by exactly one
     per-sample fault; header: the damaged member's sample is lost (or nothing, where the
     flip left the checksum's value as it was), counted as one corrupt_tar plus one orphan;
     truncate: exactly the samples not wholly before the cut are lost, with one
     truncated_tar (none where the cut leaves the first end-of-archive block whole).
  6. Resuming at any sample's `next_offset` (what a training worker saves) yields exactly
     the samples after it.
"""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
import threading
from collections import Counter
from dataclasses import dataclass

import cv2
import numpy as np
import pytest
import torch

from segany.data import PIXEL_MEAN, PIXEL_STD, SA1BDataModule
from segany.data.faults import FaultCounter
from segany.data.formats.tar import TarTruncated, iter_members
from segany.data.scenes import make_scene
from segany.data.streams.reader import read_pairs
from segany.testing.data import jpeg, sa1b_json

# long side 64 = img_size: no resize. sa_3 and sa_4 share a size, as most SA-1B images do (an image
# handed to the other's json passes the size check); the others differ
SIZES = [(48, 64), (64, 40), (56, 64), (64, 64), (64, 64), (64, 48)]
DEADLINE_S = 30.0
PER_SAMPLE = ("bad_image", "bad_json", "no_annotations", "empty_after_filter")
KINDS = ("jpeg", "json", "rle", "header", "header_lie", "truncate")


@dataclass
class Shard:
    data: bytes
    keys: list  # in shard order
    images: dict  # key -> (h, w, 3) uint8 RGB as the stored JPEG decodes
    masks: dict  # key -> list of (h, w) bool
    ids: dict  # key -> list of annotation ids
    members: dict  # name -> (header offset, data offset, size), headers of pax members included
    rle_spans: dict  # key -> [(start, end)] of each counts string, offsets in the shard
    end: int  # offset just past the last member's data padding


def _member_table(data: bytes) -> dict:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        infos = tar.getmembers()
    out, start = {}, 0
    for m in infos:  # a member's first header block is where the previous one's data ended
        out[m.name] = (start, m.offset_data, m.size)
        start = m.offset_data + (m.size + 511) // 512 * 512
    return out


def build_shard(pax: bool = False) -> Shard:
    prefix = "d" * 110 + "/" if pax else ""  # > 100 characters: the names go into pax records
    members, images, masks, ids, jsons = [], {}, {}, {}, {}
    for i, (h, w) in enumerate(SIZES):
        img, ms = make_scene(np.random.default_rng([11, i]), h, w, 3 + i % 3, textures=("flat",))
        key = f"{prefix}sa_{i}"
        enc = jpeg(img)
        images[key] = cv2.imdecode(np.frombuffer(enc, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
        meta = sa1b_json(i, ms)
        masks[key], ids[key] = ms, [a["id"] for a in meta["annotations"]]
        jsons[key] = json.dumps(meta).encode()
        members += [(f"{key}.jpg", enc), (f"{key}.json", jsons[key])]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT if pax else tarfile.USTAR_FORMAT) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(payload), 1
            tar.addfile(info, io.BytesIO(payload))
    data = buf.getvalue()
    table = _member_table(data)
    rle_spans = {}
    for key, text in jsons.items():
        at = table[f"{key}.json"][1]
        spans = [(at + m.start(1), at + m.end(1)) for m in re.finditer(rb'"counts": "([^"]*)"', text)]
        assert len(spans) == len(ids[key])
        rle_spans[key] = spans
    end = max(d + (s + 511) // 512 * 512 for _, d, s in table.values())
    return Shard(data, list(jsons), images, masks, ids, table, rle_spans, end)


_SHARDS: dict = {}


def shard(pax: bool = False) -> Shard:
    if pax not in _SHARDS:
        _SHARDS[pax] = build_shard(pax)
    return _SHARDS[pax]


# -- damage -----------------------------------------------------------------------------------
@dataclass
class Damage:
    kind: str
    data: bytes
    touched: set  # keys whose bytes changed
    what: str  # for messages
    cut: int | None = None  # truncate: the new length
    lie: tuple | None = None  # header_lie on a size: (data offset, lied size) of that member
    member: str | None = None  # header / header_lie: the damaged member's name


def _flip(buf: bytearray, positions, rng) -> None:
    for p in positions:
        buf[p] ^= int(rng.integers(1, 256))


def _checksum(block: bytes) -> bytes:
    return b"%06o\0 " % (sum(block[:148]) + 256 + sum(block[156:512]))


def _key(name: str) -> str:
    return name.rsplit(".", 1)[0]


def damage(s: Shard, kind: str, seed: int) -> Damage:
    rng = np.random.default_rng([29, KINDS.index(kind), seed])
    buf = bytearray(s.data)
    key = s.keys[int(rng.integers(len(s.keys)))]
    if kind in ("jpeg", "json"):
        _, at, size = s.members[f"{key}.{'jpg' if kind == 'jpeg' else 'json'}"]
        allowed = np.arange(at, at + size)
        if kind == "jpeg" and seed % 2 == 0:  # the marker segments (tables, frame header) at the start
            allowed = allowed[:700]
        if kind == "json":  # outside the counts strings
            inside = np.zeros(len(buf), bool)
            for a, b in s.rle_spans[key]:
                inside[a:b] = True
            allowed = allowed[~inside[allowed]]
        pos = rng.choice(allowed, int(rng.integers(1, 4)), replace=False)
        _flip(buf, pos, rng)
        return Damage(kind, bytes(buf), {key}, f"{kind} {key} bytes {sorted(int(p) for p in pos)}")
    if kind == "rle":
        a, b = s.rle_spans[key][int(rng.integers(len(s.rle_spans[key])))]
        pos = rng.choice(np.arange(a, b), min(b - a, int(rng.integers(1, 3))), replace=False)
        _flip(buf, pos, rng)
        return Damage(kind, bytes(buf), {key}, f"rle {key} bytes {sorted(int(p) for p in pos)}")
    if kind in ("header", "header_lie"):
        name = list(s.members)[int(rng.integers(len(s.members)))]
        hdr, data_at, _ = s.members[name]
        fname = ["name", "size", "checksum"][int(rng.integers(2 if kind == "header_lie" else 3))]
        pax = data_at - hdr > 512  # blocks: extended header, its records, ustar header
        if kind == "header_lie" and fname == "name" and pax:  # the path record, which no checksum covers
            block = hdr + 512
            lo = bytes(buf[block : block + 512]).index(b" path=") + 6
            hi = lo + len(name)
        else:  # the ustar header; on pax members the size or checksum of either header
            block = hdr if pax and fname != "name" and rng.random() < 0.5 else data_at - 512
            lo, hi = {"name": (0, 100), "size": (124, 136), "checksum": (148, 156)}[fname]
            if fname != "checksum":  # the characters in use, not the NULs after them
                hi = lo + max(1, len(bytes(buf[block + lo : block + hi]).split(b"\0", 1)[0]))
        pos = block + rng.choice(np.arange(lo, hi), min(hi - lo, int(rng.integers(1, 3))), replace=False)
        _flip(buf, pos, rng)
        lie = None
        if kind == "header_lie" and block != hdr + 512:
            buf[block + 148 : block + 156] = _checksum(bytes(buf[block : block + 512]))
            if fname == "size":
                try:
                    lie = (block + 512, tarfile.nti(bytes(buf[block + 124 : block + 136])))
                except tarfile.InvalidHeaderError:
                    pass
        what = f"{kind} {name} {fname} (block at {block}) bytes {sorted(int(p) for p in pos)}"
        return Damage(kind, bytes(buf), {_key(name)}, what, lie=lie, member=name)
    if kind == "truncate":
        mode = ("mid_header", "mid_member", "at_end", "anywhere")[seed % 4]
        hdr, data_at, size = s.members[list(s.members)[int(rng.integers(len(s.members)))]]
        if mode == "mid_header":
            cut = hdr + int(rng.integers(1, 512))
        elif mode == "mid_member":
            cut = data_at + int(rng.integers(0, size + (-size) % 512))
        elif mode == "at_end":
            cut = s.end + int(rng.integers(0, len(buf) - s.end))
        else:
            cut = int(rng.integers(0, len(buf)))
        return Damage(kind, bytes(buf[:cut]), set(), f"truncate {mode} at {cut} of {len(buf)}", cut=cut)
    raise ValueError(kind)


def rename(s: Shard, name: str, new: str) -> Damage:
    """Member `name` renamed to `new` in its (ustar) header, the checksum rewritten to match."""
    buf = bytearray(s.data)
    block = s.members[name][0]
    buf[block : block + 100] = new.encode().ljust(100, b"\0")
    buf[block + 148 : block + 156] = _checksum(bytes(buf[block : block + 512]))
    return Damage("header_lie", bytes(buf), {_key(name)}, f"rename {name} -> {new}", member=name)


# -- reading ----------------------------------------------------------------------------------
class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.faults = []  # (kind, key, message)

    def emit(self, record):
        if record.getMessage().startswith("skipped "):
            kind, _, _, key, message = record.args
            self.faults.append((kind, key, message))


def read_shard(path: str) -> tuple[list, list]:
    """(batches, [(kind, key, message)] warned) of the validation loader over `path`, under a deadline."""
    dm = SA1BDataModule(
        val_shards=path, img_size=64, batch_size=1, num_workers=0, max_masks=64, max_area_frac=1.0,
        max_fault_warnings=10**6,
    )  # fmt: skip
    out: dict = {}
    handler = _Records()
    logger = logging.getLogger("segany.data")
    logger.addHandler(handler)

    def run():
        try:
            dm.setup("validate")
            out["batches"] = list(dm.val_dataloader())
        except BaseException as exc:  # noqa: BLE001 - reported below
            out["error"] = exc

    try:
        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(DEADLINE_S)
    finally:
        logger.removeHandler(handler)
    assert not t.is_alive(), f"reading {path} did not end within {DEADLINE_S} s"
    if "error" in out:
        raise AssertionError(f"reading {path} raised {out['error']!r}") from out["error"]
    return out["batches"], handler.faults


def _expected(s: Shard, key: str):
    img = s.images[key]
    h, w = img.shape[:2]
    norm = (img.astype(np.float32) - np.array(PIXEL_MEAN, np.float32)) / np.array(PIXEL_STD, np.float32)
    image = np.zeros((3, 64, 64), np.float32)
    image[:, :h, :w] = norm.transpose(2, 0, 1)
    masks = np.zeros((len(s.masks[key]), 64, 64), bool)
    masks[:, :h, :w] = np.stack(s.masks[key])
    return torch.from_numpy(image), torch.from_numpy(masks)


def _hidden(s: Shard, key: str, d: Damage, skipped: list, tail: bool) -> bool:
    """Whether a member of `key` lies in bytes the reader skipped or read as another member's data."""
    for ext in ("jpg", "json"):
        hdr, data_at, size = s.members[f"{key}.{ext}"]
        end = data_at + (size + 511) // 512 * 512
        if any(a <= hdr < b or a < end <= b for a, b in skipped):
            return True
        if tail and d.cut is not None and end > d.cut:
            return True
        if d.lie is not None and d.lie[0] <= hdr < d.lie[0] + d.lie[1]:
            return True
    return False


def check(s: Shard, d: Damage, tmp_path) -> dict:
    path = str(tmp_path / "f.tar")
    with open(path, "wb") as f:
        f.write(d.data)
    batches, warned = read_shard(path)
    ctx = f"[{d.what}] warned {warned}"
    arrived = [k for b in batches for k in b["image_id"]]
    assert len(arrived) == len(set(arrived)), f"a key arrived twice: {arrived} {ctx}"
    assert set(arrived) <= set(s.keys), ctx
    counted: Counter = Counter()
    for b in batches:
        counted.update(b["faults"])
    kinds = Counter(k for k, _, _ in warned)
    assert not {"sample_error", "shard_error"} & set(kinds), ctx
    assert set(counted) == set(kinds) or not batches, f"batch counts {dict(counted)} {ctx}"
    assert all(counted[k] >= n for k, n in kinds.items()) or not batches, f"batch counts {dict(counted)} {ctx}"
    swallowed = set()
    if d.lie is not None:
        swallowed = {k for k in s.keys if k not in d.touched and _hidden(s, k, d, [], False)}
    for b in batches:
        key = b["image_id"][0]
        image, masks = _expected(s, key)
        got_ids = [i for i in b["mask_ids"][0].tolist() if i >= 0]
        if key not in d.touched and key not in swallowed or d.kind in ("header", "truncate"):
            assert got_ids == s.ids[key], f"{key} ids {ctx}"
            assert torch.equal(b["masks"][0, : len(got_ids)], masks), f"{key} masks {ctx}"
            assert not b["masks"][0, len(got_ids) :].any(), ctx
            lied_jpg = d.lie is not None and d.member == f"{key}.jpg"
            if not lied_jpg:
                torch.testing.assert_close(b["image"][0], image, msg=f"{key} image {ctx}")
            continue
        # a touched sample that passed every check: equal where the format holds checks
        assert b["original_size"][0].tolist() == list(s.images[key].shape[:2]), ctx
        if d.kind in ("json", "header_lie"):
            torch.testing.assert_close(b["image"][0], image, msg=f"{key} image {ctx}")
        if d.kind in ("jpeg", "json", "header_lie"):
            assert torch.equal(b["masks"][0, : len(got_ids)], masks), f"{key} masks {ctx}"
        if d.kind in ("jpeg", "rle", "header_lie"):
            assert len(got_ids) == len(s.ids[key]) or d.kind == "rle", ctx
            assert set(got_ids) <= set(s.ids[key]), f"{key} ids {ctx}"
    lost = [k for k in s.keys if k not in arrived]
    per_sample = {k for kind, k, _ in warned if kind in PER_SAMPLE}
    assert per_sample <= set(lost), f"a fault names a key that arrived {ctx}"
    named = {k for kind, k, _ in warned if kind not in ("corrupt_tar",)}
    skipped = []
    for kind, k, msg in warned:
        if kind == "corrupt_tar":
            at = int(k.split()[1])
            skipped.append((at, at + int(re.search(r"skipped (\d+) bytes", msg).group(1))))
    tail = "truncated_tar" in kinds
    for k in lost:
        assert k in named or _hidden(s, k, d, skipped, tail), f"{k} lost but not counted {ctx}"
    total = sum(kinds.values())
    if d.kind in ("jpeg", "json", "rle"):
        assert set(lost) <= d.touched, ctx
        assert total == len(lost) and set(kinds) <= set(PER_SAMPLE), ctx
    elif d.kind == "header":
        assert set(lost) <= d.touched, ctx
        assert kinds == ({"corrupt_tar": 1, "orphan": 1} if lost else {}), ctx
    elif d.kind == "truncate":
        whole = {k for k in s.keys if not _hidden(s, k, d, [], True)}
        assert set(arrived) == whole, ctx
        no_end = d.cut < s.end + 512
        assert kinds == ({"truncated_tar": 1} if no_end else {}), ctx
    elif d.kind == "header_lie":  # nothing before the damaged member is lost, but its predecessor (a duplicate name)
        first = s.keys.index(_key(d.member))
        assert all(s.keys.index(k) >= first - 1 for k in lost), ctx
        assert total > 0 or not lost, ctx
    # resuming at any sample's offset gives exactly the samples after it
    pairs = list(read_pairs(path, 0, FaultCounter(max_warnings=0)))
    for j in (0, len(pairs) // 2, len(pairs) - 1)[: len(pairs)]:
        again = [p.key for p in read_pairs(path, pairs[j].next_offset, FaultCounter(max_warnings=0))]
        assert again == [p.key for p in pairs[j + 1 :]], f"resume after {pairs[j].key} {ctx}"
    return dict(kinds)


def test_pristine_shards_arrive_whole(tmp_path):
    for pax in (False, True):
        s = shard(pax)
        d = Damage("none", s.data, set(), "pristine")
        assert check(s, d, tmp_path) == {}
        batches, _ = read_shard(str(tmp_path / "f.tar"))
        assert [b["image_id"][0] for b in batches] == s.keys


def _fuzz(kind, seeds, tmp_path) -> Counter:
    seen: Counter = Counter()
    for seed in seeds:
        s = shard(pax=kind.startswith("header") and seed % 2 == 1)
        seen.update(check(s, damage(s, kind, seed), tmp_path))
    return seen


@pytest.mark.parametrize("kind", KINDS)
def test_fuzz(kind, tmp_path):
    seen = _fuzz(kind, range(16), tmp_path)
    assert seen, "no seed damaged anything the reader can see"  # the seeds do reach the checks


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_fuzz_sweep(kind, tmp_path):
    _fuzz(kind, range(16, 1016), tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_training_stream_reads_what_validation_reads(kind, tmp_path):
    """The training stream (one shard, read in order) yields the same samples from the damaged
    shard as the validation loader, with the same fault counts."""
    for seed in range(4):
        _train_vs_val(shard(), damage(shard(), kind, seed), tmp_path)


def _train_vs_val(s: Shard, d: Damage, tmp_path) -> None:
    path = str(tmp_path / "f.tar")
    with open(path, "wb") as f:
        f.write(d.data)
    val, _ = read_shard(path)
    if not val:
        return
    dm = SA1BDataModule(
        train_shards=path, img_size=64, batch_size=1, num_workers=0, max_masks=64, max_area_frac=1.0,
        epoch_length=len(val), interleave=1, resampled=False,
    )  # fmt: skip
    out = {}
    t = threading.Thread(target=lambda: out.update(batches=list(dm.train_dataloader())), daemon=True)
    t.start()
    t.join(DEADLINE_S)
    assert "batches" in out, f"[{d.what}] the training stream raised or hung"
    train = out["batches"]
    assert [b["image_id"] for b in train] == [b["image_id"] for b in val], d.what
    for a, b in zip(train, val):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["masks"], b["masks"]), d.what
    # a training sample carries the faults met before it, a validation batch those met up to the
    # next sample (it is yielded one late): the running totals agree, shifted by one
    faults = lambda bs: sum((Counter(b["faults"]) for b in bs), Counter())  # noqa: E731
    for i in range(len(val) - 1):
        assert faults(train[: i + 2]) == faults(val[: i + 1]), d.what
    assert faults(train) <= faults(val), d.what


def set_field(s: Shard, name: str, lo: int, value: bytes, lie=None) -> Damage:
    """Bytes lo.. of member `name`'s (last) header set to `value`, the checksum rewritten to match."""
    buf = bytearray(s.data)
    hdr, data_at, _ = s.members[name]
    block = data_at - 512
    buf[block + lo : block + lo + len(value)] = value
    buf[block + 148 : block + 156] = _checksum(bytes(buf[block : block + 512]))
    lie = None if lie is None else (data_at, lie)
    return Damage("header_lie", bytes(buf), {_key(name)}, f"{name} bytes {lo}.. = {value!r}", lie=lie, member=name)


def pax_record_length(s: Shard, name: str, value: bytes) -> Damage:
    """The length of the path record in member `name`'s pax header set to `value` (same width)."""
    buf = bytearray(s.data)
    at = s.members[name][0] + 512
    width = bytes(buf[at : at + 8]).index(b" ")
    assert len(value) == width
    buf[at : at + width] = value
    return Damage("header_lie", bytes(buf), {_key(name)}, f"pax record length of {name} = {value!r}", member=name)


@pytest.mark.parametrize(
    "what",
    ["size not octal", "size negative", "size 8 GiB", "pax record length 0", "pax record too long"],
)
def test_lying_headers_are_counted_not_raised(what, tmp_path):
    """Headers that pass their checksum but cannot be right: before the reader checked them, the
    first ended the shard with a ValueError (counted as shard_error, the rest lost), the second
    read the rest of the file as one member, the third asked the file for 8 GiB at once, the
    fourth never returned (a pax record of length 0 does not move the parser on)."""
    s, p = shard(), shard(pax=True)
    d = {
        "size not octal": lambda: set_field(s, "sa_2.jpg", 124, b"0000x000000\0"),
        "size negative": lambda: set_field(s, "sa_2.jpg", 124, b"\xff" + (2**88 - 600).to_bytes(11, "big")),
        "size 8 GiB": lambda: set_field(s, "sa_2.jpg", 124, b"77777777777\0", lie=8**11 - 1),
        "pax record length 0": lambda: pax_record_length(p, f"{p.keys[2]}.jpg", b"000"),
        "pax record too long": lambda: pax_record_length(p, f"{p.keys[2]}.jpg", b"999"),
    }[what]()
    kinds = check(p if what.startswith("pax") else s, d, tmp_path)
    assert kinds == ({"truncated_tar": 1} if what == "size 8 GiB" else {"corrupt_tar": 1, "orphan": 1})
    if what == "size 8 GiB":  # the file is asked for at most 16 MiB at a time
        asked = []

        class Stream(io.BytesIO):
            def read(self, n=-1):
                asked.append(n)
                return super().read(n)

        with pytest.raises(TarTruncated):
            list(iter_members(Stream(d.data)))
        assert 0 < max(asked) <= 1 << 24


DUPLICATE = {"duplicate_member": 1, "orphan": 1}


@pytest.mark.parametrize(
    "name, new, expect",
    [("sa_4.jpg", "sa_3.jpg", DUPLICATE), ("sa_3.json", "sa_4.json", DUPLICATE), ("sa_2.jpg", "sa_2", {"orphan": 1})],
)
def test_renamed_member_never_pairs_with_another_key(name, new, expect, tmp_path):
    """A header that names a member after its neighbour (checksum intact) must not pair one key's
    image with another's json: a key whose group holds an extension twice is dropped, counted."""
    s = shard()
    assert check(s, rename(s, name, new), tmp_path) == expect
