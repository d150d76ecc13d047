"""A checkpoint is data, never code: a file whose pickle would create a file when unpickled
(the stand-in for arbitrary code) is refused by every entry point that reads checkpoints:
evaluate.py, the data engine, segany.export, train.py resume=PATH, fine-tuning init
`model.checkpoint=PATH` and the Python API; nothing is created and the error names the
file. Also: a stored model config naming another _target_ is not instantiated, and a
distributed checkpoint directory with a poisoned `.metadata`, `meta.pt` or non-tensor entry
is refused (torch's own DCP reader would unpickle all three)."""

import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import segany
from segany.modeling.checkpoint import CheckpointError, load_model, read_checkpoint
from segany.modeling.checkpoint.trust import load_distributed

ROOT = Path(__file__).resolve().parents[1]


class CreatesFile:
    """Unpickling this calls open(path, "w"): the file appearing means code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _weights():
    torch.manual_seed(0)
    return {"model." + k: v for k, v in segany.build_sam("vit_tiny").state_dict().items()}


@pytest.fixture(scope="module")
def weights():
    return _weights()


def _evil_ckpt(path, marker, weights):
    torch.save(
        {
            "global_step": 1,
            "state_dict": weights,
            "segany_config": {"model": {"_target_": "segany.build_sam", "variant": "vit_tiny"}},
            "callbacks": {"Evil": CreatesFile(marker)},
        },
        path,
    )
    return path


def _evil_dcp(d, marker, weights, where):
    """A valid DCP directory, poisoned in `where`: .metadata | meta.pt | entry (a non-tensor value)."""
    state = {"state_dict": dict(weights)}
    if where == "entry":
        state["extra"] = {"payload": CreatesFile(marker)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=str(d))
    meta = {"global_step": 1, "segany_config": {"model": {"_target_": "segany.build_sam", "variant": "vit_tiny"}}}
    if where == "meta.pt":
        meta["callbacks"] = CreatesFile(marker)
    torch.save(meta, d / "meta.pt")
    if where == ".metadata":
        with open(d / ".metadata", "wb") as f:
            pickle.dump(CreatesFile(marker), f)
    return d


@pytest.mark.parametrize("kind", ["ckpt", "pth", ".metadata", "meta.pt"])
def test_python_entry_points_refuse_and_name_the_file(tmp_path, weights, kind):
    marker = tmp_path / "PWNED"
    if kind == "ckpt":
        path = _evil_ckpt(tmp_path / "evil.ckpt", marker, weights)
        bad = str(path)
    elif kind == "pth":
        path = tmp_path / "evil.pth"
        torch.save({**{k[6:]: v for k, v in weights.items()}, "x": CreatesFile(marker)}, path)
        bad = str(path)
    else:
        path = _evil_dcp(tmp_path / "last.ckpt", marker, weights, kind)
        bad = str(path / kind)
    from segany.modeling.checkpoint import export

    calls = {
        "read_checkpoint": lambda: read_checkpoint(str(path)),
        "build_sam": lambda: segany.build_sam("vit_tiny", checkpoint=str(path)),
        "load_model": lambda: load_model(str(path)),
        "export": lambda: export(str(path), str(tmp_path / "out.pth")),
    }
    for name, call in calls.items():
        with pytest.raises(CheckpointError, match="refusing to unpickle") as e:
            call()
        assert bad in str(e.value) and "open" in str(e.value), (name, str(e.value))
        assert not marker.exists(), name
    assert not (tmp_path / "out.pth").exists()
    # the opt-in is explicit and per call: with it, the trusted file is unpickled
    if kind == "ckpt":
        read_checkpoint(str(path), trust=True)
        assert marker.exists()


def test_poisoned_dcp_entry_is_refused_where_resume_reads_it(tmp_path, weights):
    """The resume path (AtomicModelParallelStrategy.load_checkpoint -> load_distributed) reads
    non-tensor entries (optimiser hyper-parameters) through a weights-only check."""
    marker = tmp_path / "PWNED"
    d = _evil_dcp(tmp_path / "last.ckpt", marker, weights, "entry")
    read_checkpoint(str(d))  # the model's tensors alone are fine
    with pytest.raises(CheckpointError, match="refusing to unpickle") as e:
        load_distributed({"extra": {"payload": None}}, d)
    assert str(d) in str(e.value) and "extra.payload" in str(e.value)
    assert not marker.exists()
    d2 = _evil_dcp(tmp_path / "meta.ckpt", marker, weights, ".metadata")
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_distributed({"state_dict": {}}, d2)
    assert not marker.exists()
    # plain optimiser hyper-parameters pass the check
    ok = tmp_path / "ok"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"opt": {"lr": 1e-3, "betas": (0.9, 0.999), "params": ["a.weight"]}}, checkpoint_id=str(ok))
    got = {"opt": {"lr": 0.0, "betas": (0.0, 0.0), "params": []}}
    load_distributed(got, ok)
    assert got["opt"] == {"lr": 1e-3, "betas": (0.9, 0.999), "params": ["a.weight"]}


def test_stored_model_config_is_never_instantiated(tmp_path, weights):
    marker = tmp_path / "PWNED"
    path = tmp_path / "target.ckpt"
    node = {"_target_": "builtins.open", "file": str(marker), "mode": "w"}
    torch.save({"global_step": 1, "state_dict": weights, "segany_config": {"model": node}}, path)
    for call in (lambda: load_model(str(path)), lambda: segany.build_sam(checkpoint=str(path))):
        with pytest.raises(CheckpointError, match="builtins.open") as e:
            call()
        assert str(path) in str(e.value)
    (tmp_path / "side.pth").write_bytes(b"")
    torch.save({k[6:]: v for k, v in weights.items()}, tmp_path / "side.pth")
    (tmp_path / "side.json").write_text('{"_target_": "os.system", "command": "touch PWNED"}')
    with pytest.raises(CheckpointError, match="side.json.*os.system"):
        segany.build_sam(checkpoint=str(tmp_path / "side.pth"))
    assert not marker.exists()


def _run(args, cwd=ROOT, timeout=300):
    env = dict(os.environ, HYDRA_FULL_ERROR="1", WANDB_MODE="offline", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def evil(tmp_path, weights):
    marker = tmp_path / "PWNED"
    return _evil_ckpt(tmp_path / "evil.ckpt", marker, weights), marker


def _assert_refused(p, path, marker):
    out = p.stdout + p.stderr
    assert p.returncode != 0, out[-3000:]
    assert "refusing to unpickle" in out and str(path) in out, out[-3000:]
    assert not marker.exists()


def test_cli_export_refuses(tmp_path, evil):
    path, marker = evil
    p = _run(["-m", "segany.export", str(path), str(tmp_path / "out.pth")])
    _assert_refused(p, path, marker)
    assert p.returncode == 2 and not (tmp_path / "out.pth").exists()


def test_cli_engine_refuses(tmp_path, evil):
    from PIL import Image

    path, marker = evil
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 48)).save(tmp_path / "images" / "a.jpg")
    p = _run(
        ["-m", "segany.engine", "auto", "--input", str(tmp_path / "images"), "--out", str(tmp_path / "o")]
        + [
            "--checkpoint",
            str(path),
        ]
    )
    _assert_refused(p, path, marker)


def test_cli_evaluate_refuses(tmp_path, evil):
    path, marker = evil
    p = _run(["evaluate.py", f"checkpoint={path}", f"paths.root_dir={tmp_path}", f"output_dir={tmp_path}/eval"])
    _assert_refused(p, path, marker)


TRAIN = [
    "logger=csv",
    "data.num_train=2",
    "data.num_val=1",
    "data.shard_size=2",
    "data.max_masks=2",
    "data.batch_size=1",
    "data.num_workers=0",
    "trainer.max_steps=1",
    "callbacks.time_budget=null",
    "~callbacks.progress_bar",
]


def test_cli_train_finetune_init_refuses(tmp_path, evil):
    path, marker = evil
    p = _run(
        ["train.py", f"paths.root_dir={tmp_path}", f"data.root={tmp_path}/data", *TRAIN, f"model.checkpoint={path}"]
    )
    _assert_refused(p, path, marker)


def test_cli_train_resume_refuses(tmp_path, evil):
    path, marker = evil
    p = _run(["train.py", f"paths.root_dir={tmp_path}", f"data.root={tmp_path}/data", *TRAIN, f"resume={path}"])
    _assert_refused(p, path, marker)
    assert not list(tmp_path.rglob("last.ckpt"))
