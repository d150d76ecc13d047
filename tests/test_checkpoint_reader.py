"""segany.modeling.checkpoint: one reader for a train.py .ckpt file, an FSDP (torch distributed
checkpoint) directory and a SAM .pth; the architecture comes from the checkpoint itself
(the demo's width-128 decoder needs no overrides). Truths: the in-memory model's weights
and predictions, the official `segment_anything` model, and torch's own DCP consolidation
(`dcp_to_torch_save`)."""

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import compose

import segany
from segany.modeling.checkpoint import CheckpointError, load_model, read_checkpoint
from segany.utils.config import register_resolvers
from tests._official import build_official_tiny_sam

ROOT = Path(__file__).resolve().parents[1]
register_resolvers()
# configs/experiment/demo.yaml's network, as train.py stores it (segany_config.model)
DEMO_NODE = {
    "_target_": "segany.build_sam",
    "variant": "vit_tiny",
    "checkpoint": None,
    "encoder_init": None,
    "drop_path_rate": 0.1,
    "decoder_dropout": 0.0,
    "grad_checkpointing": False,
    "decoder_depth": 2,
    "img_size": 192,
    "window_size": 6,
    "prompt_embed_dim": 128,
    "decoder_heads": 4,
    "decoder_mlp_dim": 1024,
}


def demo_model(seed=0):
    torch.manual_seed(seed)
    args = {k: v for k, v in DEMO_NODE.items() if k not in ("_target_", "checkpoint", "encoder_init")}
    m = segany.build_sam(**dict(args, drop_path_rate=0.0)).eval()
    with torch.no_grad():  # zero-initialised tensors non-trivial too
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return m


def lightning_ckpt(model, step=7):
    """The layout train.py's checkpoints have (Lightning 2.6 + SamModule.on_save_checkpoint)."""
    return {
        "epoch": 0,
        "global_step": step,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": {"model." + k: v for k, v in model.state_dict().items()},
        "loops": {"fit_loop": {"epoch_loop.state_dict": {"_batches_that_stepped": step}}},
        "callbacks": {"TimeBudget": {"planned": 10, "milestones": []}},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]}],
        "lr_schedulers": [],
        "segany_config": {"name": "demo", "model": dict(DEMO_NODE)},
    }


def write_dcp(model, path, step=7):
    """A sharded checkpoint as ModelParallelStrategy writes it (state_dict + optimizer_0
    through torch.distributed.checkpoint, the rest in meta.pt), in one process."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.zero_grad()
    model.mask_decoder.iou_token.weight.sum().backward()
    opt.step()  # in place: `model` holds the stepped weights that are saved
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = {
        "state_dict": {"model." + k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizer_0": get_optimizer_state_dict(model, opt),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=str(path))
    meta = lightning_ckpt(model, step)
    del meta["state_dict"], meta["optimizer_states"]
    torch.save(meta, Path(path) / "meta.pt")
    return state["state_dict"]


def _predict(model, image, point):
    pred = segany.SamPredictor(model)
    pred.set_image(image)
    masks, iou, low = pred.predict(point_coords=point, point_labels=np.array([1]), multimask_output=True)
    return masks, iou, low


@pytest.fixture(scope="module")
def image():
    return (np.random.default_rng(0).random((150, 200, 3)) * 255).astype(np.uint8)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_ckpt_file_rebuilds_the_stored_architecture(tmp_path):
    model = demo_model()
    path = tmp_path / "last.ckpt"
    torch.save(lightning_ckpt(model), path)
    loaded = segany.build_sam(checkpoint=str(path))  # no variant, no overrides
    assert loaded.config.prompt_embed_dim == 128 and loaded.image_encoder.img_size == 192
    assert loaded.config.drop_path_rate == 0.0  # a training switch: the caller's, not the checkpoint's
    _same_weights(loaded, model)
    again, what = load_model(str(path))
    _same_weights(again, model)
    assert what == f"{path} (step 7)"
    # fine-tuning init from it (configs/model/vit_tiny.yaml + the recipe's switches): the stored
    # architecture, the caller's dropout
    tuned = segany.build_sam("vit_tiny", checkpoint=str(path), decoder_depth=2, decoder_dropout=0.1, drop_path_rate=0.2)
    assert tuned.config.decoder_dropout == 0.1 and tuned.config.drop_path_rate == 0.2
    _same_weights(tuned, model)
    # a request that contradicts the stored architecture is an error naming the file and the key
    with pytest.raises(CheckpointError, match="prompt_embed_dim=256") as e:
        segany.build_sam("vit_tiny", checkpoint=str(path), prompt_embed_dim=256)
    assert str(path) in str(e.value)
    with pytest.raises(CheckpointError, match="variant=vit_b"):
        segany.build_sam("vit_b", checkpoint=str(path))


def test_real_train_py_checkpoint_layout_is_read(tmp_path):
    """What Lightning itself writes through AtomicCheckpointIO (a Trainer attached to a
    SamModule) loads with weights_only and gives the module's weights."""
    import pytorch_lightning as pl

    from segany.training.checkpointing import AtomicCheckpointIO
    from segany.training.module import SamModule

    model = demo_model()
    module = SamModule(model, run_config={"name": "demo", "model": dict(DEMO_NODE)})
    trainer = pl.Trainer(
        accelerator="cpu", plugins=[AtomicCheckpointIO()], logger=False, enable_checkpointing=False, max_steps=0
    )
    trainer.strategy.connect(module)
    trainer.strategy._lightning_module = module
    module.trainer = trainer
    path = tmp_path / "real.ckpt"
    trainer.save_checkpoint(str(path), weights_only=True)
    torch.load(path, weights_only=True)  # plain data
    ck = read_checkpoint(str(path))
    assert ck.kind == "lightning" and ck.model_config["prompt_embed_dim"] == 128
    _same_weights(segany.build_sam(checkpoint=str(path)), model)
    assert AtomicCheckpointIO().load_checkpoint(path)["segany_config"]["name"] == "demo"


def test_official_pth_loads_strictly_with_the_size_its_shapes_show(tmp_path):
    official = build_official_tiny_sam(seed=3)
    path = tmp_path / "sam_tiny.pth"
    torch.save(official.state_dict(), path)
    ours = segany.build_sam("vit_tiny", checkpoint=str(path))
    mine = ours.state_dict()
    for k, v in official.state_dict().items():  # the release names the encoder MLP lin1/lin2
        assert torch.equal(mine[k.replace(".mlp.lin", ".mlp.fc") if k.startswith("image_encoder.") else k], v), k
    model, what = load_model(str(path))  # no model config: the architecture comes from the shapes
    _same_weights(model, ours)
    assert what == f"official {path}"
    from omegaconf import OmegaConf

    model, what = load_model(str(path), OmegaConf.create({"_target_": "segany.build_sam", "variant": "vit_tiny"}))
    _same_weights(model, ours)
    partial = {k: v for k, v in official.state_dict().items() if k != "image_encoder.pos_embed"}
    torch.save(partial, tmp_path / "no_pos.pth")
    with pytest.raises(ValueError, match="stores no architecture"):
        load_model(str(tmp_path / "no_pos.pth"))  # not a whole SAM: nothing to read the size from
    sd = official.state_dict()
    del sd["mask_decoder.iou_token.weight"]
    torch.save(sd, tmp_path / "cut.pth")
    with pytest.raises(CheckpointError, match=r"(?s)cut.pth.*1 missing key.*iou_token"):
        segany.build_sam("vit_tiny", checkpoint=str(tmp_path / "cut.pth"))


def test_exported_pth_carries_its_architecture_beside_it(tmp_path, image):
    model = demo_model()
    path = tmp_path / "last.ckpt"
    torch.save(lightning_ckpt(model), path)
    out = tmp_path / "sam_demo.pth"
    from segany.modeling.checkpoint import export

    export(str(path), str(out))
    side = json.loads((tmp_path / "sam_demo.json").read_text())
    assert side["prompt_embed_dim"] == 128 and side["img_size"] == 192 and "drop_path_rate" not in side
    raw = torch.load(out, weights_only=True)
    assert set(raw) == set(segany.modeling.checkpoint.to_official(model.state_dict()))  # nothing extra
    loaded = segany.build_sam(checkpoint=str(out))
    _same_weights(loaded, model)
    a, b = _predict(loaded, image, np.array([[60.0, 70.0]])), _predict(model, image, np.array([[60.0, 70.0]]))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    # save_official writes the same file pair
    segany.save_official(model, str(tmp_path / "saved.pth"))
    assert json.loads((tmp_path / "saved.json").read_text()) == side


def test_distributed_checkpoint_directory_single_process(tmp_path, image):
    """A DCP directory written with torch.distributed.checkpoint.save in one process: the
    reader's weights equal torch's own consolidation and the model; SamPredictor predicts
    as the in-memory model; evaluate.py evaluates it with no model overrides."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    model = demo_model()
    d = tmp_path / "checkpoints" / "last.ckpt"
    write_dcp(model, d)
    dcp_to_torch_save(str(d), str(tmp_path / "full.pt"))  # the library's consolidation (our own file)
    full = torch.load(tmp_path / "full.pt", weights_only=True)["state_dict"]
    ck = read_checkpoint(str(d))
    assert ck.kind == "distributed" and ck.step == 7 and ck.model_config["img_size"] == 192
    assert ck.state_dict.keys() == {k.removeprefix("model.") for k in full}
    for k, v in full.items():
        assert torch.equal(ck.state_dict[k.removeprefix("model.")], v), k
    loaded = segany.build_sam(checkpoint=str(d))
    _same_weights(loaded, model)
    for x, y in zip(
        _predict(loaded, image, np.array([[100.0, 40.0]])), _predict(model, image, np.array([[100.0, 40.0]]))
    ):
        np.testing.assert_array_equal(x, y)

    sys.path.insert(0, str(ROOT))
    import evaluate as evaluate_script

    out = tmp_path / "eval"
    cfg = compose(
        f"checkpoint={d}",
        f"output_dir={out}",
        f"data.root={tmp_path}/syn",
        "data.num_train=1",
        "data.num_val=2",
        "data.shard_size=1",
        "data.num_workers=0",
        "points.clicks=[1,2]",
        f"paths.root_dir={tmp_path}",
        name="evaluate",
    )
    metrics = evaluate_script.evaluate(cfg)
    assert 0 <= metrics["points"]["mean"]["miou@1"] <= 1
    assert f"{d} (step 7)" in json.dumps(metrics)  # the model it names is the directory
