"""segany.export: Lightning-style single-file checkpoints -> release SAM .pth, exactly;
anything without SAM weights -> an error naming the path."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import segany
from segany.export import export, main
from segany.modeling.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    m = segany.build_sam("vit_tiny")
    with torch.no_grad():  # make zero-initialised tensors non-trivial too
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return m


def _lightning_ckpt(model, prefix="model."):
    return {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.6.0",
        "state_dict": {prefix + k: v for k, v in model.state_dict().items()},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]}],
        "lr_schedulers": [],
        "segany_config": {"model": {"variant": "vit_tiny"}},
    }


@pytest.mark.parametrize("prefix", ["model.", "net.", "model._orig_mod."])
def test_single_file_round_trip(tmp_path, tiny, prefix):
    ckpt = tmp_path / "last.ckpt"
    torch.save(_lightning_ckpt(tiny, prefix), ckpt)
    out = tmp_path / "sam.pth"
    assert main([str(ckpt), str(out)]) == 0
    raw = torch.load(out, map_location="cpu", weights_only=True)
    assert any(".mlp.lin1." in k for k in raw) and not any(".mlp.fc1." in k for k in raw)  # release names
    loaded = segany.build_sam("vit_tiny", checkpoint=str(out))
    ref = tiny.state_dict()
    assert loaded.state_dict().keys() == ref.keys()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_cli_bf16_weights_become_fp32(tmp_path, tiny):
    ckpt = tmp_path / "bf16.ckpt"
    sd = _lightning_ckpt(tiny)
    sd["state_dict"] = {k: v.bfloat16() for k, v in sd["state_dict"].items()}
    torch.save(sd, ckpt)
    out = tmp_path / "sub" / "sam.pth"
    r = subprocess.run(
        [sys.executable, "-m", "segany.export", str(ckpt), str(out), "--variant", "vit_tiny"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    raw = torch.load(out, map_location="cpu", weights_only=True)
    assert all(v.dtype == torch.float32 for v in raw.values())
    # atomic writes left nothing behind: the weights and their architecture sidecar only
    assert sorted(p.name for p in out.parent.iterdir()) == ["sam.json", "sam.pth"]


def test_bad_inputs_name_the_path(tmp_path, tiny):
    out = tmp_path / "sam.pth"
    cases = {}
    cases["missing"] = tmp_path / "nope.ckpt"
    cases["garbage"] = tmp_path / "garbage.ckpt"
    cases["garbage"].write_bytes(b"not a checkpoint at all")
    cases["no_sam"] = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"model.backbone.weight": torch.zeros(3)}}, cases["no_sam"])
    cases["empty_dir"] = tmp_path / "emptydir"
    cases["empty_dir"].mkdir()
    cases["two_models"] = tmp_path / "two.ckpt"
    sd = _lightning_ckpt(tiny)
    sd["state_dict"].update({"ema." + k: v for k, v in tiny.state_dict().items()})
    torch.save(sd, cases["two_models"])
    cases["wrong_size"] = tmp_path / "cut.ckpt"
    sd = _lightning_ckpt(tiny)
    sd["state_dict"] = {k: v for k, v in sd["state_dict"].items() if "blocks.3." not in k}
    torch.save(sd, cases["wrong_size"])
    messages = {
        "missing": "does not exist",
        "garbage": "cannot read",
        "no_sam": "holds no SAM weights",
        "empty_dir": "not a torch.distributed.checkpoint",
        "two_models": "several",
        "wrong_size": "do not match",
    }
    for name, path in cases.items():
        with pytest.raises(CheckpointError, match=messages[name]) as e:
            export(str(path), str(out))
        assert str(path) in str(e.value), name
    assert not out.exists()
    # the prefix can be chosen when there are several
    export(str(cases["two_models"]), str(out), prefix="ema.")
    assert out.is_file()
    # the CLI reports instead of a traceback
    r = subprocess.run(
        [sys.executable, "-m", "segany.export", str(cases["no_sam"]), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "holds no SAM weights" in r.stderr and str(cases["no_sam"]) in r.stderr
