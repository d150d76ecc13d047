"""train.py with 2 CPU processes (gloo): DDP with bf16 autocast, and FSDP2 (ModelParallelStrategy)
with a bf16 MixedPrecisionPolicy and activation checkpointing; the sharded checkpoint is
written atomically as a directory, resumes (through segany's safe DCP reader), and exports
to a .pth that the official `segment_anything` model loads and runs with the same outputs as
segany's; the directory itself is read by build_sam / SamPredictor and evaluated by
evaluate.py with no model overrides."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_train

import segany
from tests._official import build_official_tiny_sam

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "logger=csv",
    "data.num_train=8",
    "data.num_val=4",
    "data.shard_size=2",
    "data.max_masks=3",
    "data.batch_size=1",
    "data.num_workers=0",
    "trainer.limit_val_batches=1",
    "trainer.devices=2",
    "callbacks.checkpoint.every_n_train_steps=2",
    "prompting.point_rounds=1",
    "prompting.mask_rounds=1",
    # vit_tiny as built (the demo runs at 192 px with a width-128 decoder): exported below
    "model.img_size=256",
    "model.window_size=8",
    "model.prompt_embed_dim=256",
    "model.decoder_heads=8",
    "model.decoder_mlp_dim=2048",
]


def _train(root, *args):
    p = run_train(f"paths.root_dir={root}", f"data.root={root}/data", *SMALL, *args)
    return p.stdout + p.stderr


def test_ddp_two_processes_bf16(tmp_path):
    _train(
        tmp_path,
        "strategy=ddp",
        "precision=bf16",
        "trainer.max_steps=2",
        "optim.fused=false",  # Lightning clips no fused-optimiser gradients under mixed precision
        "trainer.check_val_every_n_epoch=null",
        "trainer.val_check_interval=2",  # one validation, after step 2: one image per rank
    )
    # the per-round means are over both ranks' masks, 3 in each rank's image (data.max_masks): the
    # last round's is then the mean of the ranks' own means, as Lightning's synced val/iou_last
    metrics = (tmp_path / "demo" / "logs" / "metrics.csv").read_text().splitlines()
    (row,) = [r for r in csv.DictReader(metrics) if r.get("val/iou_last")]
    assert float(row["val_round/masks"]) == 2 * 3
    assert float(row["val_round/iou_02"]) == pytest.approx(float(row["val/iou_last"]), rel=1e-5)
    assert {f"val_round/{k}_{t:02d}" for k in ("iou", "loss") for t in range(3)} <= row.keys()
    assert (tmp_path / "demo" / "round_iou.png").stat().st_size > 0
    assert [p.name for p in (tmp_path / "demo" / "logs" / "val_images").iterdir()] == ["step0000002_0.png"]  # rank 0's
    ckpt = torch.load(tmp_path / "demo" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    # both ranks' data positions travel in the checkpoint (each resumes its own stream)
    (data_state,) = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert [r["rank"] for r in data_state["ranks"]] == [0, 1], data_state.keys()
    assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values())  # fp32 master weights


@pytest.mark.parametrize(
    "param_dtype",
    [
        # fp32 parameters in the default suite: this test is about the sharded checkpoint's path
        # (write, resume, export, evaluate); the bf16 policy's numerics are tested in
        # test_sharding.py, and bf16 matmuls are slow on CPUs without bf16 units (~2.5 min here)
        "float32",
        pytest.param("bfloat16", marks=pytest.mark.slow),
    ],
)
def test_fsdp_two_processes_checkpoint_resume_export(tmp_path, param_dtype):
    fsdp = [
        "trainer.check_val_every_n_epoch=100",
        "strategy=fsdp",
        "trainer.strategy.data_parallel_size=2",
        "precision=fp32",
        f"module.sharding.param_dtype={param_dtype}",
        "module.sharding.activation_checkpointing=true",
    ]
    _train(tmp_path, *fsdp, "trainer.max_steps=2")
    last = tmp_path / "demo" / "checkpoints" / "last.ckpt"
    assert last.is_dir() and (last / ".metadata").is_file() and len(list(last.glob("*.distcp"))) == 2
    assert not (tmp_path / "demo" / "checkpoints" / "last.ckpt.tmp").exists()
    out = _train(tmp_path, *fsdp, "trainer.max_steps=4")  # resume=auto continues to step 4
    assert "resuming from" in out
    pth = tmp_path / "sam.pth"
    r = subprocess.run(
        [sys.executable, "-m", "segany.export", str(last), str(pth), "--variant", "vit_tiny"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ours = segany.build_sam("vit_tiny", checkpoint=str(pth)).eval()
    official = build_official_tiny_sam()
    official.load_state_dict(torch.load(pth, map_location="cpu", weights_only=True), strict=True)
    official.eval()
    # trained: the export differs from a fresh model
    fresh = segany.build_sam("vit_tiny").state_dict()
    assert any(not torch.equal(v, fresh[k]) for k, v in ours.state_dict().items() if v.is_floating_point())
    torch.manual_seed(0)
    img = torch.rand(1, 3, 256, 256) * 255
    pts = torch.tensor([[[60.0, 80.0], [150.0, 120.0]]])
    lab = torch.tensor([[1, 0]])
    with torch.no_grad():
        a = ours([{"image": img[0], "original_size": (256, 256), "point_coords": pts, "point_labels": lab}], True)[0]
        b = official([{"image": img[0], "original_size": (256, 256), "point_coords": pts, "point_labels": lab}], True)[
            0
        ]
    assert torch.allclose(a["low_res_logits"], b["low_res_logits"], atol=1e-4)
    assert torch.allclose(a["iou_predictions"], b["iou_predictions"], atol=1e-5)

    # the directory itself, with no export and no model overrides: segany's reader gives
    # torch's own consolidation of the model (dcp_to_torch_save) ...
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from segany.modeling.checkpoint import read_checkpoint

    dcp_to_torch_save(str(last), str(tmp_path / "full.pt"))  # our own file: the library's reader
    full = torch.load(tmp_path / "full.pt", map_location="cpu", weights_only=False)["state_dict"]
    ck = read_checkpoint(str(last))
    assert ck.step == 4 and ck.state_dict.keys() == {k.removeprefix("model.") for k in full}
    assert all(torch.equal(ck.state_dict[k.removeprefix("model.")], v) for k, v in full.items())
    # ... SamPredictor on build_sam(checkpoint=<dir>) predicts as on the exported .pth ...
    image = (torch.rand(200, 150, 3, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8).numpy()
    preds = []
    for model in (segany.build_sam(checkpoint=str(last)), ours):
        predictor = segany.SamPredictor(model.eval())
        predictor.set_image(image)
        preds.append(predictor.predict(point_coords=np.array([[70.0, 90.0]]), point_labels=np.array([1])))
    for x, y in zip(*preds):
        np.testing.assert_array_equal(x, y)
    # ... and evaluate.py evaluates it
    r = subprocess.run(
        [sys.executable, "evaluate.py", f"checkpoint={last}", f"output_dir={tmp_path}/eval"]
        + [f"paths.root_dir={tmp_path}", f"data.root={tmp_path}/evaldata", "data.num_val=2", "data.num_train=1"]
        + ["data.shard_size=1", "points.clicks=[1]"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert 0 <= metrics["points"]["mean"]["miou@1"] <= 1 and f"{last} (step 4)" in json.dumps(metrics)
