"""experiment=hq_sam / hq_demo: the recipe composes with HQ-SAM's numbers, trains through train.py
with only the HQ parts changing (SAM's weights bit-identical to the checkpoint it started from),
and resumes exactly."""

import pytest
import torch
from helpers import compose, run_train, write_run_checkpoint

from segany.modeling.hq import HQ_KEYS

SMALL = [
    "logger=csv",
    "data.num_train=8",
    "data.num_val=2",
    "data.shard_size=4",
    "data.batch_size=2",
    "data.max_masks=2",
    "data.min_side=64",
    "data.max_side=96",
    "trainer.max_time=null",
    "~callbacks.time_budget",
    "trainer.check_val_every_n_epoch=1",
    "trainer.limit_val_batches=1",
    "callbacks.checkpoint.every_n_train_steps=2",
]


def test_hq_sam_composes_with_the_release_recipe():
    cfg = compose("experiment=hq_sam", "model.checkpoint=sam.pth", "data.train_images=a", "data.train_annotations=b")
    assert cfg.model.hq_token is True and cfg.module.trainable
    p, loss, opt = cfg.prompting, cfg.loss, cfg.optim
    assert (p.point_rounds, p.mask_rounds, p.init_points, p.multimask, p.hq_output) == (0, 0, 10, False, "hq")
    assert abs(p.p_mask - 1 / 3) < 1e-6 and p.p_box == 0.5 and p.box_noise_frac == 0.0
    assert (loss.focal_gamma, loss.focal_alpha, loss.iou_weight) == (0, -1, 0)  # BCE, no IoU head
    assert loss.focal_weight == loss.dice_weight == 1
    assert (opt.lr, opt.weight_decay, opt.warmup_iters, opt.gamma) == (1e-3, 0.0, 0, 0.1)
    assert cfg.data.max_masks == 1 and cfg.data.flip and cfg.data.jitter


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _state(path):
    c = torch.load(path, map_location="cpu", weights_only=False)
    return c["global_step"], c["state_dict"], c["optimizer_states"][0]["state"]


def _args(tmp_path):
    base = write_run_checkpoint(tmp_path / "base")
    return base, [f"model.checkpoint={base}", f"data.root={tmp_path}/data", "experiment=hq_demo", *SMALL]


def test_hq_demo_trains_only_the_hq_parts(tmp_path):
    base, args = _args(tmp_path)
    run_train(f"paths.root_dir={tmp_path}/a", "trainer.max_steps=2", *args)
    start = {k[len("model.") :]: v for k, v in _weights(base).items()}
    _, w, opt = _state(tmp_path / "a" / "hq_demo" / "checkpoints" / "last.ckpt")
    trained = {k[len("model.") :]: v for k, v in w.items()}
    hq = [k for k in trained if k.startswith(HQ_KEYS)]
    assert hq and set(trained) == set(start) | set(hq)
    for k, v in start.items():  # SAM frozen: every one of its tensors as it was loaded
        assert torch.equal(trained[k], v), k
    # the optimiser holds the HQ parameters only, and every one of them has had gradients
    assert len(opt) == len(hq) and all(s["exp_avg"].abs().sum() > 0 for s in opt.values())


@pytest.mark.slow
def test_hq_demo_kill_and_resume_is_bit_identical(tmp_path):
    """4 steps straight vs 2 steps, SIGKILL at the start of step 3, resume to 4: the same HQ weights
    and optimiser state, bit for bit (HQ-SAM's random prompt kinds and mask noise included)."""
    _, args = _args(tmp_path)
    run_train(f"paths.root_dir={tmp_path}/a", "trainer.max_steps=4", *args)
    kill = ["+callbacks.kill._target_=tests._kill.KillAt", "+callbacks.kill.step=3"]
    run_train(f"paths.root_dir={tmp_path}/b", "trainer.max_steps=4", *args, *kill, expect_rc=-9)
    p = run_train(f"paths.root_dir={tmp_path}/b", "trainer.max_steps=4", *args)
    assert "resuming from" in p.stderr + p.stdout
    sa, wa, oa = _state(tmp_path / "a" / "hq_demo" / "checkpoints" / "last.ckpt")
    sb, wb, ob = _state(tmp_path / "b" / "hq_demo" / "checkpoints" / "last.ckpt")
    assert sa == sb == 4 and wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert len(oa) == len(ob) and all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i])
