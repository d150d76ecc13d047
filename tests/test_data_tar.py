"""Tar reading: members and offsets as tarfile sees them, resuming at an offset, and each
kind of damage reported once without losing the rest of the shard."""

import io
import tarfile

import pytest
from webdataset import TarWriter

from segany.data.faults import FaultCounter
from segany.data.formats.tar import TarTruncated, iter_members
from segany.data.streams.reader import read_pairs, split_name
from segany.testing.data import member_offsets, write_tar


def _members(n, prefix="sa_"):
    out = []
    for i in range(n):
        out += [(f"{prefix}{i}.jpg", bytes([i]) * (100 + 37 * i)), (f"{prefix}{i}.json", b'{"k": %d}' % i)]
    return out


def test_members_and_offsets_match_tarfile(tmp_path):
    path = str(tmp_path / "a.tar")
    write_tar(path, _members(4))
    ref = member_offsets(path)
    with open(path, "rb") as f:
        got = list(iter_members(f))
    assert [m.name for m in got] == list(ref)
    for m in got:
        off, data_off, size = ref[m.name]
        assert m.offset == off and len(m.data) == size
        assert m.next_offset == data_off + (size + 511) // 512 * 512


def test_long_names_pax_and_gnu(tmp_path):
    long = "d" * 120 + "/sa_1.jpg"
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            for name, data in [(long, b"x" * 700), ("sa_2.json", b"{}")]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        buf.seek(0)
        got = list(iter_members(buf))
        assert [(m.name, len(m.data)) for m in got] == [(long, 700), ("sa_2.json", 2)]
        assert got[0].offset == 0  # the extended header belongs to the member


def test_resume_from_offset(tmp_path):
    path = str(tmp_path / "a.tar")
    write_tar(path, _members(5))
    faults = FaultCounter()
    pairs = list(read_pairs(path, 0, faults))
    assert [p.key for p in pairs] == [f"sa_{i}" for i in range(5)]
    resumed = list(read_pairs(path, pairs[1].next_offset, faults))
    assert [p.key for p in resumed] == ["sa_2", "sa_3", "sa_4"]
    assert resumed[0].image == pairs[2].image and resumed[0].json == pairs[2].json
    assert list(read_pairs(path, pairs[-1].next_offset, faults)) == []
    assert faults.total == {}


def test_webdataset_writer_shards_read_back(tmp_path):
    path = str(tmp_path / "w.tar")
    with TarWriter(path) as w:
        for i in range(3):
            w.write({"__key__": f"dir/sa_{i}", "jpg": b"img%d" % i, "json": b"{}"})
    pairs = list(read_pairs(path, 0, FaultCounter()))
    assert [(p.key, p.image) for p in pairs] == [(f"dir/sa_{i}", b"img%d" % i) for i in range(3)]


def test_split_name_like_webdataset():
    assert split_name("a.b/sa_1.seg.json") == ("a.b/sa_1", "seg.json")
    assert split_name("sa_1.JPG") == ("sa_1", "jpg")
    assert split_name("README") == (None, None)


def test_truncated_mid_member_counts_once_and_keeps_earlier(tmp_path):
    path = str(tmp_path / "t.tar")
    write_tar(path, _members(4))
    off, data_off, size = member_offsets(path)["sa_2.jpg"]
    with open(path, "r+b") as f:
        f.truncate(data_off + size // 2)  # cut inside sa_2.jpg's data
    faults = FaultCounter()
    pairs = list(read_pairs(path, 0, faults))
    assert [p.key for p in pairs] == ["sa_0", "sa_1"]
    assert faults.total == {"truncated_tar": 1}


@pytest.mark.parametrize("cut_at", ["json_header", "boundary"])
def test_truncated_between_members(tmp_path, cut_at):
    path = str(tmp_path / "t.tar")
    write_tar(path, _members(3))
    off, _, _ = member_offsets(path)["sa_1.json"]
    with open(path, "r+b") as f:
        f.truncate(off + (100 if cut_at == "json_header" else 0))
    faults = FaultCounter()
    pairs = list(read_pairs(path, 0, faults))
    assert [p.key for p in pairs] == ["sa_0"]
    # the lost json of sa_1 is part of the truncation, not a second (orphan) fault
    assert faults.total == {"truncated_tar": 1}


def test_missing_end_of_archive_is_truncation(tmp_path):
    path = str(tmp_path / "t.tar")
    write_tar(path, _members(2))
    end = max(d + (s + 511) // 512 * 512 for _, d, s in member_offsets(path).values())
    with open(path, "r+b") as f:
        f.truncate(end)  # all members whole, no end blocks
    faults = FaultCounter()
    assert [p.key for p in read_pairs(path, 0, faults)] == ["sa_0", "sa_1"]
    assert faults.total == {"truncated_tar": 1}
    with open(path, "rb") as f, pytest.raises(TarTruncated):
        list(iter_members(f))


def test_corrupt_header_resyncs(tmp_path):
    path = str(tmp_path / "c.tar")
    write_tar(path, _members(4))
    off, _, _ = member_offsets(path)["sa_1.jpg"]
    with open(path, "r+b") as f:
        f.seek(off + 148)
        f.write(b"9999999\0")  # wrong checksum
    faults = FaultCounter()
    pairs = list(read_pairs(path, 0, faults))
    # sa_1.jpg is lost (its json is an orphan); everything after it is still read
    assert [p.key for p in pairs] == ["sa_0", "sa_2", "sa_3"]
    assert faults.total == {"corrupt_tar": 1, "orphan": 1}


def test_orphans(tmp_path):
    path = str(tmp_path / "o.tar")
    members = _members(4)
    del members[3]  # sa_1.json missing -> orphan jpg
    del members[3]  # sa_2.jpg missing -> orphan json
    write_tar(path, members)
    faults = FaultCounter()
    assert [p.key for p in read_pairs(path, 0, faults)] == ["sa_0", "sa_3"]
    assert faults.total == {"orphan": 2}


def test_unopenable_and_failing_pipe_are_shard_errors(tmp_path):
    faults = FaultCounter()
    assert list(read_pairs(str(tmp_path / "nope.tar"), 0, faults)) == []
    assert list(read_pairs("pipe:exit 3", 0, faults)) == []
    assert faults.total == {"shard_error": 2}


def test_pipe_and_fsspec_urls(tmp_path):
    import fsspec

    path = str(tmp_path / "p.tar")
    write_tar(path, _members(3))
    expect = ["sa_0", "sa_1", "sa_2"]
    faults = FaultCounter()
    assert [p.key for p in read_pairs(f"pipe:cat {path}", 0, faults)] == expect
    with open(path, "rb") as f:
        fsspec.filesystem("memory").pipe("/shards/p.tar", f.read())
    pairs = list(read_pairs("memory://shards/p.tar", 0, faults))
    assert [p.key for p in pairs] == expect
    # resuming on a pipe skips bytes instead of seeking
    assert [p.key for p in read_pairs(f"pipe:cat {path}", pairs[0].next_offset, faults)] == expect[1:]
    assert faults.total == {}
