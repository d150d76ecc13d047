"""Shard specs a person can type: a directory, a list file, a brace range that survives bash
and Hydra; errors naming the spec; the counts a run records (data_resolved); a key given twice
on the command line (bash-expanded braces) refused before Hydra runs."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf

from segany.data import SA1BDataModule, SA1BMixtureDataModule
from segany.data.streams.shards import expand, resolve
from segany.testing.data import jpeg, sa1b_json, write_tar
from segany.utils.cli import check_overrides

ROOT = Path(__file__).resolve().parents[1]
SIDE = 32


def write_shard(path, ids):
    img = np.full((SIDE, SIDE, 3), 100, np.uint8)
    mask = np.zeros((SIDE, SIDE), bool)
    mask[4:20, 4:20] = True
    members = []
    for i in ids:
        members += [(f"sa_{i}.jpg", jpeg(img)), (f"sa_{i}.json", sa1b_json(i, [mask]))]
    write_tar(str(path), members)


def val_ids(spec):
    dm = SA1BDataModule(val_shards=spec, img_size=SIDE, batch_size=2, num_workers=0)
    dm.setup("validate")
    return [k for b in dm.val_dataloader() for k in b["image_id"]], dm.resolved


@pytest.fixture
def shard_dir(tmp_path):
    d = tmp_path / "sa1b"
    d.mkdir()
    for s in (2, 0, 1):  # written out of order: the listing is sorted by name
        write_shard(d / f"sa_{s:06d}.tar", [10 * s, 10 * s + 1])
    (d / "README.txt").write_text("not a shard\n")
    (d / "sub").mkdir()
    write_shard(d / "sub" / "sa_000009.tar", [90])  # not directly in the directory: not listed
    return d


def test_directory_is_its_tar_files_sorted(shard_dir):
    expected = [str(shard_dir / f"sa_{s:06d}.tar") for s in range(3)]
    assert resolve(str(shard_dir)) == expected
    ids, resolved = val_ids(str(shard_dir))
    assert ids == ["sa_0", "sa_1", "sa_10", "sa_11", "sa_20", "sa_21"]
    assert resolved == {"val": {"count": 3, "first": expected[0], "last": expected[-1]}}


def test_empty_directory_fails_naming_it(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"data.train_shards: directory .*empty holds no \*.tar shard"):
        SA1BDataModule(str(tmp_path / "empty"), epoch_length=1).setup("fit")


def test_list_file_lines_comments_and_relative_paths(shard_dir, tmp_path, monkeypatch):
    lst = shard_dir / "train.shards"
    lst.write_text(
        "# SA-1B training shards\n"
        "sa_000002.tar\n"
        "\n"
        f"   {shard_dir / 'sa_000000.tar'}   # absolute, with a comment\n"
        "sub/sa_000009.tar\n"
    )
    monkeypatch.chdir(tmp_path)  # relative lines are relative to the list file, not to the cwd
    assert resolve(str(lst)) == [str(shard_dir / p) for p in ("sa_000002.tar", "sa_000000.tar", "sub/sa_000009.tar")]
    ids, resolved = val_ids(str(lst))
    assert ids == ["sa_20", "sa_21", "sa_0", "sa_1", "sa_90"]
    assert resolved["val"]["count"] == 3
    # a brace range on a line, and list + directory joined by "::"
    (shard_dir / "b.txt").write_text("sa_{000000..000001}.tar\n")
    assert [os.path.basename(u) for u in expand(f"{shard_dir / 'b.txt'}::{shard_dir}")] == [
        "sa_000000.tar",
        "sa_000001.tar",
        "sa_000000.tar",
        "sa_000001.tar",
        "sa_000002.tar",
    ]


def test_list_file_errors_name_the_file(shard_dir):
    with pytest.raises(FileNotFoundError, match=r"data.val_shards: shard list file .*nowhere.txt does not exist"):
        SA1BDataModule(val_shards=str(shard_dir / "nowhere.txt")).setup()
    (shard_dir / "blank.list").write_text("# nothing yet\n\n")
    with pytest.raises(FileNotFoundError, match=r"blank.list lists no shard"):
        resolve(str(shard_dir / "blank.list"))
    (shard_dir / "typo.txt").write_text("sa_000000.tar\nsa_000007.tar\n")
    with pytest.raises(FileNotFoundError, match=r"of 2 shards from .*typo.txt.*1 missing \(e.g. .*sa_000007.tar"):
        SA1BDataModule(val_shards=str(shard_dir / "typo.txt")).setup()


def test_pipe_urls_pass_unchanged():
    assert expand("pipe:cat /a/sa_{0..1}.tar") == ["pipe:cat /a/sa_0.tar", "pipe:cat /a/sa_1.tar"]


def test_resolved_counts_follow_train_num_shards_and_mixture_sources(shard_dir):
    dm = SA1BDataModule(f"{shard_dir}/sa_{{000000..000999}}.tar", str(shard_dir), epoch_length=1)
    got = dm.resolve_shards()  # no shard is opened: the 1000 need not exist yet
    assert got["train"] == {
        "count": 1000,
        "first": f"{shard_dir}/sa_000000.tar",
        "last": f"{shard_dir}/sa_000999.tar",
    }
    assert got["val"]["count"] == 3
    dm = SA1BDataModule(str(shard_dir), train_num_shards=2, epoch_length=1)
    assert dm.resolve_shards()["train"]["count"] == 2
    (shard_dir / "manual.txt").write_text("sa_000001.tar\n")
    mix = SA1BMixtureDataModule(
        sources={"manual": {"shards": str(shard_dir / "manual.txt"), "weight": 10}, "auto": {"shards": str(shard_dir)}},
        epoch_length=1,
        img_size=SIDE,
    )
    mix.setup("fit")
    train = mix.resolved["train"]
    assert train["count"] == 4 and train["sources"]["manual"]["count"] == 1 and train["sources"]["auto"]["count"] == 3


def test_run_config_records_the_resolved_counts(tmp_path):
    """train.py: the config.yaml of a run shows the 1000 shards it resolved, not the spec only."""
    import pytorch_lightning as pl
    from helpers import compose
    from hydra.utils import instantiate

    import train

    # what Hydra receives from bash for 'data.train_shards="/datasets/sa1b/sa_{000000..000999}.tar"'
    cfg = compose("experiment=vit_b_sa1b", 'data.train_shards="/datasets/sa1b/sa_{000000..000999}.tar"')
    dm = instantiate(cfg.data)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    resolved = train.resolve_data(dm, trainer)
    train.save_run_config(cfg, str(tmp_path / "config.yaml"), resolved)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["data_resolved"]["train"] == {
        "count": 1000,
        "first": "/datasets/sa1b/sa_000000.tar",
        "last": "/datasets/sa1b/sa_000999.tar",
    }
    assert saved["data"]["train_shards"] == "/datasets/sa1b/sa_{000000..000999}.tar"
    assert saved["name"] == "vit_b_sa1b" and OmegaConf.create(saved).model.variant == "vit_b"


def _bash(command, timeout=300):
    return subprocess.run(
        ["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=dict(os.environ)
    )


def test_quoted_brace_range_survives_bash_and_hydra():
    p = _bash(
        f"{sys.executable} train.py experiment=vit_h_sa1b "
        "'data.train_shards=\"/datasets/sa1b/sa_{000000..000999}.tar\"' --cfg job"
    )
    assert p.returncode == 0, p.stderr[-3000:]
    spec = yaml.safe_load(p.stdout)["data"]["train_shards"]
    assert spec == "/datasets/sa1b/sa_{000000..000999}.tar"
    assert expand(spec) == [f"/datasets/sa1b/sa_{i:06d}.tar" for i in range(1000)]


def test_unquoted_range_fails_before_hydra_naming_the_key():
    p = _bash(f"{sys.executable} train.py data.train_shards=/x/sa_{{000000..000003}}.tar --cfg job")
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    assert "data.train_shards is given 4 times" in p.stderr, p.stderr
    assert "'data.train_shards=\"/x/sa_{000000..000003}.tar\"'" in p.stderr  # the spelling to paste
    assert "defaults" not in p.stdout  # Hydra never printed a config
    p = _bash(f"{sys.executable} evaluate.py data.val_shards=/x/sa_{{0..1}}.tar --cfg job")
    assert p.returncode == 2 and "data.val_shards is given 2 times" in p.stderr, p.stderr


@pytest.mark.parametrize(
    "args,key,times",
    [
        (["a.b=1", "+a.b=2", "++a.b=3"], "a.b", 3),
        (["~callbacks.x", "callbacks.x=null"], "callbacks.x", 2),
        (["hydra.run.dir=a", "hydra.run.dir=b"], "hydra.run.dir", 2),
        (["-m", "lr=1,2", "seed=0", "lr=3"], "lr", 2),
    ],
)
def test_repeated_keys_are_refused(args, key, times, capsys):
    with pytest.raises(SystemExit) as exc:
        check_overrides(args)
    assert exc.value.code == 2
    assert f"{key} is given {times} times" in capsys.readouterr().err


def test_single_keys_sweeps_flags_and_lightning_relaunch_pass():
    check_overrides(["-m", "optim.lr=1e-4,2e-4", "seed=range(0,3)", "--cfg", "job", "-cn", "train", "experiment=demo"])
    check_overrides(["--config-name=train", "--info", "defaults", "~logger", "+x=1"])
    # what Lightning appends when it re-launches train.py for DDP rank 1 (run dir set by the user too)
    check_overrides(
        [
            "hydra.run.dir=runs/a",
            "trainer.devices=2",
            'hydra.run.dir="runs/a"',
            "hydra.job.name=train_ddp_process_1",
            "hydra.output_subdir=null",
        ]
    )
