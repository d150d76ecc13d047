"""One spelling of the checkpoint options at every entry point: Hydra keys `checkpoint` /
`trust_checkpoint` (evaluate.py) and `model.checkpoint` / `model.trust_checkpoint` (train.py,
present in every configs/model/*.yaml), argparse `--checkpoint` / `--trust-checkpoint`. Each old
spelling fails with an error naming the new one."""

import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import compose
from hydra.errors import InstantiationException
from hydra.utils import instantiate

import segany
from segany.utils.cli import RENAMED, check_overrides

ROOT = Path(__file__).resolve().parents[1]


def _refused(call) -> str:
    """The message (stderr / argparse error) of a call that must exit with status 2."""
    with pytest.raises(SystemExit) as e:
        call()
    assert e.value.code == 2
    return str(e.value)


# ----------------------------------------------------------------------------- Hydra


@pytest.mark.parametrize(
    "arg, new",
    [
        ("ckpt_path=runs/demo/checkpoints/last.ckpt", "checkpoint"),
        ("+ckpt_path=x.ckpt", "checkpoint"),
        ("ckpt_trust=true", "trust_checkpoint"),
        ("+model.trust_checkpoint=true", "model.trust_checkpoint"),
        ("trainer.precision=bf16-mixed", "precision"),
        ("ckpt_path=a.ckpt,b.ckpt", "checkpoint"),  # a -m sweep over the old key
        ("clicks=[1,3]", "points.clicks"),
    ],
)
def test_old_hydra_keys_fail_naming_the_new_one(capsys, arg, new):
    _refused(lambda: check_overrides(["task=all", arg]))
    err = capsys.readouterr().err
    assert repr(arg) in err and f"is now {new}" in err


def test_new_hydra_keys_pass_the_check():
    check_overrides(["checkpoint=x.ckpt", "trust_checkpoint=true", "precision=bf16"])
    check_overrides(["model.checkpoint=x.ckpt", "model.trust_checkpoint=true"])
    check_overrides(["++model.trust_checkpoint=true"])
    assert {"ckpt_path", "ckpt_trust", "+model.trust_checkpoint", "trainer.precision"} <= set(RENAMED)


def test_every_model_config_has_trust_checkpoint():
    files = sorted((ROOT / "configs" / "model").glob("*.yaml"))
    assert len(files) >= 5
    for f in files:
        cfg = compose(f"model={f.stem}", "model.checkpoint=x.pth", "model.trust_checkpoint=true")
        assert cfg.model.trust_checkpoint is True and cfg.model.checkpoint == "x.pth", f.name
    cfg = compose("checkpoint=x.ckpt", "trust_checkpoint=true", name="evaluate")
    assert cfg.checkpoint == "x.ckpt" and cfg.trust_checkpoint is True


class CreatesFile:
    """Unpickling this calls open(path, "w"): the file appearing means code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_model_trust_checkpoint_reaches_build_sam(tmp_path):
    """train.py builds cfg.model: model.trust_checkpoint decides whether the file may run code."""
    torch.manual_seed(0)
    weights = {"model." + k: v for k, v in segany.build_sam("vit_tiny").state_dict().items()}
    marker = tmp_path / "RAN"
    path = tmp_path / "evil.ckpt"
    node = {"_target_": "segany.build_sam", "variant": "vit_tiny"}
    torch.save({"state_dict": weights, "segany_config": {"model": node}, "x": CreatesFile(marker)}, path)
    cfg = compose("experiment=finetune", f"model.checkpoint={path}")
    with pytest.raises(InstantiationException, match="refusing to unpickle.*model.trust_checkpoint=true"):
        instantiate(cfg.model)
    assert not marker.exists()
    instantiate(compose("experiment=finetune", f"model.checkpoint={path}", "model.trust_checkpoint=true").model)
    assert marker.exists()


@pytest.mark.parametrize(
    "script, old, new",
    [
        ("evaluate.py", "ckpt_trust=true", "trust_checkpoint"),
        ("train.py", "+model.trust_checkpoint=true", "model.trust_checkpoint"),
    ],
)
def test_scripts_check_before_hydra(script, old, new):
    """The check runs in the script itself, before Hydra composes anything."""
    p = subprocess.run([sys.executable, script, old], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and f"is now {new}" in p.stderr, p.stderr[-2000:]


def test_docs_check_refuses_what_the_scripts_refuse():
    """tests/test_docs_commands.py composes the documented commands in-process: an old key fails there too."""
    import doc_commands as dc

    with pytest.raises(ValueError, match="ckpt_path is now checkpoint"):
        dc.compose_jobs(ROOT, "evaluate.py", ["ckpt_path=x.ckpt"])
    ((args, cfg, _),) = dc.compose_jobs(ROOT, "evaluate.py", ["checkpoint=x.ckpt"], resolve=False)
    assert cfg.checkpoint == "x.ckpt"


# ----------------------------------------------------------------------------- argparse


def _engine(argv):
    from segany.engine.cli import parser

    return parser().parse_args(argv)


def _annotate(argv):
    from segany.annotate.__main__ import parser

    return parser().parse_args(argv)


def _export(argv):
    from segany.export import main

    return main(argv)


def _amg_speed(argv):
    old = sys.argv
    sys.argv = ["amg_speed.py", *argv]
    try:
        runpy.run_path(str(ROOT / "benchmarks" / "amg_speed.py"), run_name="__main__")
    finally:
        sys.argv = old


TOOLS = {
    "engine": (_engine, ["auto", "--input", "in", "--out", "out"]),
    "annotate": (_annotate, ["--images", "in", "--out", "out"]),
    "amg_speed": (_amg_speed, []),
}


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_argparse_tools_take_checkpoint_and_refuse_ckpt(capsys, tool):
    call, base = TOOLS[tool]
    for old in (["--ckpt", "x.ckpt"], ["--ckpt=x.ckpt"], ["--ckp", "x.ckpt"]):
        _refused(lambda: call(base + old))
        assert "--ckpt was renamed: use --checkpoint" in capsys.readouterr().err
    if tool == "amg_speed":  # parses, then benchmarks: only its --help here
        with pytest.raises(SystemExit):
            call(["--help"])
        out = capsys.readouterr().out
        assert "--checkpoint" in out and "--trust-checkpoint" in out and "--ckpt" not in out
        return
    args = call(base + ["--checkpoint", "x.ckpt", "--trust-checkpoint"])
    assert args.checkpoint == "x.ckpt" and args.trust_checkpoint is True and not hasattr(args, "ckpt")
    args = call(base)
    assert args.checkpoint is None and args.trust_checkpoint is False


def test_export_takes_trust_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    model = segany.build_sam("vit_tiny")
    src = tmp_path / "last.ckpt"
    node = {"_target_": "segany.build_sam", "variant": "vit_tiny"}
    torch.save({"state_dict": model.state_dict(), "segany_config": {"model": node}, "o": object()}, src)
    assert _export([str(src), str(tmp_path / "a.pth")]) == 2
    assert "--trust-checkpoint" in capsys.readouterr().err
    assert _export([str(src), str(tmp_path / "a.pth"), "--trust-checkpoint"]) == 0
    raw = torch.load(tmp_path / "a.pth", weights_only=True)
    assert torch.equal(raw["mask_decoder.iou_token.weight"], model.state_dict()["mask_decoder.iou_token.weight"])
