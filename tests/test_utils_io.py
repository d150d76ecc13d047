"""segany.utils.io: atomic file writes and the directory swap."""

import json
import os

import pytest
import torch

from segany.utils.io import atomic_torch_save, atomic_write, atomic_write_json, replace_dir


def test_complete_write_replaces_the_file_with_the_usual_permissions(tmp_path):
    path = tmp_path / "sub" / "a.json"
    atomic_write_json(path, {"x": 1})
    atomic_write_json(path, {"x": 2}, indent=1)
    assert json.loads(path.read_text()) == {"x": 2} and path.read_text() == '{\n "x": 2\n}'
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert os.listdir(path.parent) == ["a.json"]


def test_an_exception_mid_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_write(path, "wb") as f:
            f.write(b"half of the new")
            f.flush()
            assert path.read_bytes() == b"old"  # the new bytes go elsewhere until the end
            (tmp,) = [n for n in os.listdir(tmp_path) if n != "a.bin"]
            assert tmp.startswith("a.bin.tmp-")  # the engine removes a killed run's by this prefix
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_bad_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(tmp_path / "a", "a"):
            pass
    assert not os.listdir(tmp_path)


def test_atomic_torch_save_round_trip(tmp_path):
    path = tmp_path / "w.pth"
    atomic_torch_save({"w": torch.arange(5.0)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(5.0))
    assert os.listdir(tmp_path) == ["w.pth"]


def test_directory_swap_and_an_interrupted_one(tmp_path, monkeypatch):
    from segany.training.checkpointing import resolve_checkpoint

    path, tmp = tmp_path / "ckpt", tmp_path / "ckpt.tmp"
    path.mkdir(), tmp.mkdir()
    (path / "a").write_text("1"), (tmp / "a").write_text("2")
    replace_dir(tmp, path)
    assert (path / "a").read_text() == "2" and sorted(os.listdir(tmp_path)) == ["ckpt"]

    tmp.mkdir()
    (tmp / "a").write_text("3")
    real_replace, calls = os.replace, []

    def dies_on_the_second_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the two renames")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dies_on_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(tmp, path)
    assert not path.exists() and (tmp_path / "ckpt.old" / "a").read_text() == "2"
    assert resolve_checkpoint(path) == str(tmp_path / "ckpt.old")
    monkeypatch.setattr(os, "replace", real_replace)
    replace_dir(tmp, path)  # the next save cleans up
    assert (path / "a").read_text() == "3" and sorted(os.listdir(tmp_path)) == ["ckpt"]
