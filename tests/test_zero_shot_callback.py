"""ZeroShotValidation: a tiny training run evaluates every 2 steps, and the figures it logs to
the CSV logger equal evaluate.py's on the checkpoint of the same step and the same subset."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import compose

ROOT = Path(__file__).resolve().parents[1]

DATA = [
    "data.num_workers=0",
    "data.num_train=8",
    "data.num_val=4",
    "data.shard_size=4",
    "data.max_masks=3",
]


def _train(tmp_path):
    import train

    cfg = compose(
        "logger=csv",
        f"paths.root_dir={tmp_path}",
        f"data.root={tmp_path}/synthetic",
        *DATA,
        "data.batch_size=2",
        "trainer.max_steps=4",
        "trainer.limit_val_batches=0",
        "prompting.point_rounds=1",
        "prompting.mask_rounds=0",
        "trainer.enable_progress_bar=false",
        "~callbacks.progress_bar",
        "callbacks.checkpoint.every_n_train_steps=2",
        "+callbacks/zero_shot=default",
        "callbacks.zero_shot.every_n_steps=2",
        "callbacks.zero_shot.max_batches=1",
        "callbacks.zero_shot.settings={points: {clicks: [1, 2]}}",
    )
    train.train(cfg)
    return Path(cfg.paths.run_dir)


def _evaluate(tmp_path, ckpt, out, batch_size=2, max_batches=1):
    sys.path.insert(0, str(ROOT))
    import evaluate as evaluate_script

    cfg = compose(
        f"checkpoint={ckpt}",
        f"output_dir={out}",
        f"paths.root_dir={tmp_path}",
        f"data.root={tmp_path}/synthetic",
        *DATA,
        f"data.batch_size={batch_size}",
        f"max_batches={max_batches}",
        "points.clicks=[1,2]",
        name="evaluate",
    )
    return evaluate_script.evaluate(cfg)


def test_zero_shot_every_two_steps_logs_what_evaluate_py_measures(tmp_path):
    run = _train(tmp_path)
    with open(run / "logs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("zero_shot/points/val/miou@1")]
    assert [int(r["step"]) for r in rows] == [2, 4]
    for row in rows:
        step = int(row["step"])
        assert (run / "zero_shot" / f"step{step:07d}" / "points_miou_vs_clicks.png").is_file()
        direct = _evaluate(tmp_path, run / "checkpoints" / f"step{step:07d}.ckpt", tmp_path / f"direct{step}")
        got = direct["points"]["datasets"]["synthetic"]
        assert got["num_images"] == 2  # max_batches=1 batch of 2 images
        for k in ("miou@1", "miou@2", "miou_oracle@1", "miou_oracle@2"):
            assert float(row[f"zero_shot/points/val/{k}"]) == pytest.approx(got[k], abs=1e-6), (step, k)


@pytest.mark.slow  # two processes: ~2 min on the shared 2-core machine
def test_ddp_rank0_evaluates_while_the_other_rank_waits(tmp_path):
    """2 CPU processes (gloo): the run completes (no rank left waiting), the figures are logged at
    steps 2 and 4, and the last one equals evaluate.py on the final checkpoint."""
    env = dict(os.environ, WANDB_MODE="offline", HYDRA_FULL_ERROR="1", OMP_NUM_THREADS="1")
    args = [f"paths.root_dir={tmp_path}", f"data.root={tmp_path}/synthetic", *DATA, "logger=csv", "strategy=ddp"]
    args += ["trainer.devices=2", "data.batch_size=1", "trainer.max_steps=4", "trainer.limit_val_batches=0"]
    args += ["prompting.point_rounds=1", "prompting.mask_rounds=0", "+callbacks/zero_shot=default"]
    args += ["callbacks.zero_shot.every_n_steps=2", "callbacks.zero_shot.max_batches=2"]
    args += ["callbacks.zero_shot.settings={points: {clicks: [1, 2]}}"]
    args += ["trainer.enable_progress_bar=false", "~callbacks.progress_bar"]
    p = subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    run = tmp_path / "demo"
    with open(run / "logs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("zero_shot/points/val/miou@1")]
    assert [int(r["step"]) for r in rows] == [2, 4]
    direct = _evaluate(tmp_path, run / "checkpoints" / "last.ckpt", tmp_path / "direct", batch_size=1, max_batches=2)[
        "points"
    ]["datasets"]["synthetic"]
    assert direct["num_images"] == 2
    assert float(rows[-1]["zero_shot/points/val/miou@2"]) == pytest.approx(direct["miou@2"], abs=1e-6)
