"""evaluate.py end to end (in-process, Hydra config): all five tasks on tiny synthetic data,
sharded evaluation merging to the single-rank result, and sweep_dir tabulation."""

import json
import os
import sys
from pathlib import Path

import pytest
from helpers import compose, write_run_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp_path, *overrides):
    data = [
        f"data.root={tmp_path}/syn",
        "data.num_train=2",
        "data.num_val=2",
        "data.shard_size=1",
        "data.num_workers=0",
        "data.min_side=96",
        "data.max_side=128",
        f"paths.root_dir={tmp_path}",
    ]
    return compose(*data, *overrides, name="evaluate")


def _evaluate(cfg):
    sys.path.insert(0, str(ROOT))
    import evaluate as evaluate_script

    return evaluate_script.evaluate(cfg)


def test_all_tasks_write_metrics_tables_and_plots(tmp_path):
    out = tmp_path / "out"
    m = _evaluate(
        _cfg(
            tmp_path,
            "task=all",
            f"output_dir={out}",
            "points.clicks=[1,2]",
            "max_images=1",
            "proposals.points_per_side=4",
            "edges.points_per_side=4",
            "edges.n_thresholds=9",
            "noc.max_clicks=2",
        )
    )
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(m))
    assert {"points", "noc", "proposals", "instances", "edges"} <= set(saved)
    assert saved["points"]["datasets"]["synthetic"]["num_images"] == 2
    shape = {"datasets", "mean", "settings", "description", "figures", "seconds"}
    for sec in ("points", "noc", "proposals", "instances", "edges"):  # one section shape for every task
        assert set(saved[sec]) == shape, sec
        assert saved[sec]["mean"]["num_images"] == saved[sec]["datasets"]["synthetic"]["num_images"], sec
    assert not {k for k in saved if "@" in k}  # no metric outside its task's section
    assert saved["points"]["settings"]["clicks"] == [1, 2] and saved["noc"]["settings"]["max_clicks"] == 2
    for sec, key in (("noc", "miou@2"), ("proposals", "AR@1000"), ("instances", "AP"), ("edges", "ODS")):
        v = saved[sec]["datasets"]["synthetic"][key]
        assert 0 <= v <= 1, (sec, v)
        assert saved[sec]["datasets"]["synthetic"]["num_images"] == 1
    md = (out / "results.md").read_text()
    for title in ("## points", "## noc", "## proposals", "## instances", "## edges", "| synthetic |"):
        assert title in md
    for png in ("points_miou_vs_clicks.png", "noc_miou_vs_clicks.png", "proposals_ar.png", "edges_pr.png"):
        assert (out / png).stat().st_size > 1000
    assert saved["edges"]["figures"] == ["edges_pr.png"] and saved["instances"]["figures"] == []
    points_header = next(line for line in md.splitlines() if "miou@1" in line)
    assert points_header.startswith("| dataset | miou@1 | miou@2 | miou_oracle@1 | miou_oracle@2 | num_masks |")


def test_sharded_points_merge_to_the_single_rank_result(tmp_path):
    single = _evaluate(_cfg(tmp_path, f"output_dir={tmp_path}/one", "points.clicks=[1,2]"))["points"]["mean"]
    assert single["num_images"] == 2
    shared = [f"output_dir={tmp_path}/two", "points.clicks=[1,2]", "world_size=2", "merge_timeout_s=5"]
    assert _evaluate(_cfg(tmp_path, "rank=1", *shared)) == {}  # rank 1: its part only
    parts = sorted(os.listdir(tmp_path / "two" / "parts"))
    assert parts == ["points.synthetic.rank0001-of-0002.json"]
    merged = _evaluate(_cfg(tmp_path, "rank=0", *shared))["points"]["mean"]
    for k in ("miou@1", "miou@2", "miou_oracle@1", "num_masks", "num_images"):
        assert merged[k] == pytest.approx(single[k]), k
    again = _evaluate(_cfg(tmp_path, "rank=0", "merge_only=true", *shared))["points"]["mean"]
    assert again["miou@1"] == pytest.approx(single["miou@1"])
    changed = [o if not o.startswith("points.clicks") else "points.clicks=[1,3]" for o in shared]
    with pytest.raises(FileNotFoundError, match="from another evaluation"):  # stale parts are never merged
        _evaluate(_cfg(tmp_path, "rank=0", "merge_only=true", *changed))
    with pytest.raises(FileNotFoundError, match="parts"):
        _evaluate(
            _cfg(
                tmp_path,
                "rank=0",
                "merge_only=true",
                f"output_dir={tmp_path}/three",
                "world_size=2",
                "merge_timeout_s=0",
            )
        )


def _fake_run(run_dir, seed, overrides, hydra_dir):
    """A run directory as train.py leaves it: checkpoints/last.ckpt (Lightning format with the
    resolved model config) and Hydra's overrides.yaml."""
    write_run_checkpoint(run_dir, seed)
    os.makedirs(run_dir / hydra_dir)
    (run_dir / hydra_dir / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))


def test_sweep_dir_tabulates_every_run(tmp_path):
    sweep = tmp_path / "sweep"
    _fake_run(sweep / "0", 1, ["optim.lr=1e-3"], ".hydra")
    _fake_run(sweep / "1", 2, ["optim.lr=1e-4", "model.drop_path_rate=0.1"], "hydra")
    os.makedirs(sweep / "no_ckpt")
    _evaluate(_cfg(tmp_path, f"sweep_dir={sweep}", "points.clicks=[1,3]"))
    rows = json.loads((sweep / "results.json").read_text())
    assert [r["run"] for r in rows] == ["0", "1"]
    assert rows[1]["overrides"] == ["optim.lr=1e-4", "model.drop_path_rate=0.1"]
    for r in rows:
        own = json.loads((sweep / r["run"] / "eval" / "last-synthetic-syn" / "metrics.json").read_text())
        own = own["points"]["mean"]
        assert r["miou@1"] == own["miou@1"] and r["miou@3"] == own["miou@3"]
    assert rows[0]["miou@1"] != rows[1]["miou@1"]  # different weights, different rows
    md = (sweep / "results.md").read_text()
    assert "| 0 | `optim.lr=1e-3` |" in md and "`model.drop_path_rate=0.1`" in md
    with pytest.raises(FileNotFoundError, match="no run directory"):
        _evaluate(_cfg(tmp_path, f"sweep_dir={sweep / 'no_ckpt'}"))


def test_bf16_precision_runs_every_task_close_to_fp32(tmp_path):
    """precision=bf16: every task runs under autocast (CPU here), the points result stays near fp32's."""
    common = ["points.clicks=[1]", "max_images=1", "proposals.points_per_side=4", "edges.points_per_side=4"]
    common += ["edges.n_thresholds=9", "noc.max_clicks=2"]
    fp32 = _evaluate(_cfg(tmp_path, "task=points", f"output_dir={tmp_path}/fp32", *common))
    bf16 = _evaluate(_cfg(tmp_path, "task=all", "precision=bf16", f"output_dir={tmp_path}/bf16", *common))
    assert bf16["points"]["mean"]["miou@1"] == pytest.approx(fp32["points"]["mean"]["miou@1"], abs=0.05)
    for sec, key in (("noc", "miou@2"), ("proposals", "AR@1000"), ("instances", "AP"), ("edges", "ODS")):
        assert 0 <= bf16[sec]["datasets"]["synthetic"][key] <= 1, sec
    with pytest.raises(ValueError, match="precision"):
        _evaluate(_cfg(tmp_path, "task=points", "precision=fp16", f"output_dir={tmp_path}/bad", *common))


def test_the_points_settings_at_the_top_level_are_refused_naming_their_new_key(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="clicks"):  # not in the config: Hydra refuses it
        _cfg(tmp_path, "clicks=[1]")
    with pytest.raises(ValueError, match=r"points\.clicks"):  # added with +: refused, not silently ignored
        _evaluate(_cfg(tmp_path, "+clicks=[1]", f"output_dir={tmp_path}/out"))
