"""LoRA adapters on the image encoder (segany.modeling.lora, through peft): the config keys
reach the built model; only the adapters (plus parts left unfrozen) get gradients; the merged
export loads in the official `segment_anything` package and gives the unmerged model's
outputs; a LoRA training run checkpoints base + adapters and resumes."""

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import compose
from hydra.utils import instantiate

import segany
from segany.modeling.checkpoint import CheckpointError, export, load_model
from segany.modeling.lora import LoraSpec, lora_parameters
from segany.testing.toy import toy_batch
from segany.training import PromptConfig, SamLoss, SamModule, SamOptim, param_groups, simulate
from tests._official import build_official_tiny_sam, make_test_image

ALL = ["qkv", "proj", "fc1", "fc2"]
PATHS = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


def _adapted(model) -> set:
    from peft.tuners.lora import LoraLayer

    return {n for n, m in model.image_encoder.named_modules() if isinstance(m, LoraLayer)}


def test_config_keys_reach_the_built_model():
    cfg = compose("lora=all", "model.lora.rank=4", "model.lora.alpha=2", "model.lora.dropout=0.25")  # demo + LoRA
    assert cfg.module.freeze_image_encoder is False and cfg.optim.layer_decay == 1.0
    assert cfg.module.model.lora == cfg.model.lora  # the module builds the same node
    model = instantiate(cfg.model, _convert_="all")  # as train.py does
    depth = len(model.image_encoder.blocks)
    assert _adapted(model) == {f"blocks.{i}.{PATHS[t]}" for i in range(depth) for t in ALL}
    fc1 = model.image_encoder.blocks[0].mlp.fc1
    assert fc1.lora_A["default"].weight.shape == (4, fc1.in_features)
    assert fc1.lora_B["default"].weight.shape == (fc1.out_features, 4)
    assert fc1.scaling["default"] == 2 / 4 and fc1.lora_dropout["default"].p == 0.25
    assert isinstance(model.image_encoder.patch_embed.proj, torch.nn.Conv2d)  # `proj` means the blocks' only
    assert model.lora == LoraSpec(rank=4, alpha=2, targets=tuple(ALL), dropout=0.25)

    qkv = instantiate(compose("lora=qkv").model)  # DictConfig node, as load_model passes it
    assert _adapted(qkv) == {f"blocks.{i}.attn.qkv" for i in range(depth)}
    assert qkv.image_encoder.blocks[1].attn.qkv.lora_A["default"].weight.shape[0] == 8
    assert compose().model.lora is None and not _adapted(instantiate(compose().model))  # off by default


def test_bad_lora_settings_name_the_key():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['ranks'\]"):
        segany.build_sam("vit_tiny", lora={"ranks": 4})
    with pytest.raises(ValueError, match="model.lora.targets"):
        segany.build_sam("vit_tiny", lora={"targets": ["fc3"]})
    with pytest.raises(ValueError, match="model.lora.rank"):
        segany.build_sam("vit_tiny", lora={"rank": 0})
    model = segany.build_sam("vit_tiny", depth=2, global_attn_indexes=(1,), lora={"rank": 2})
    with pytest.raises(ValueError, match="freeze_image_encoder"):
        SamModule(model, freeze_image_encoder=True)


def _small(lora):
    torch.manual_seed(0)
    kw = dict(depth=2, global_attn_indexes=(1,), prompt_embed_dim=64, decoder_mlp_dim=128)
    return segany.build_sam("vit_tiny", lora=lora, **kw)


def _backward(module: SamModule):
    module.train()
    torch.manual_seed(0)
    batch = toy_batch(2, 2, 256, generator=torch.Generator().manual_seed(0))
    cfg = PromptConfig(point_rounds=1, mask_rounds=1)
    out = simulate(module.model, module.embed(batch["image"]), batch, cfg, SamLoss())
    out["loss"].backward()


@pytest.mark.parametrize("train_decoder", [False, True])
def test_only_lora_parameters_receive_gradients(train_decoder):
    model = _small({"rank": 2, "targets": ALL})
    module = SamModule(model, freeze_prompt_encoder=True, freeze_mask_decoder=not train_decoder)
    _backward(module)
    lora = lora_parameters(model)
    assert len(lora) == 2 * 2 * len(ALL)  # A and B x 2 blocks x 4 projections
    graded = {n for n, p in model.named_parameters() if p.grad is not None}
    assert set(lora) <= graded
    assert all(lora[n].grad.abs().sum() > 0 for n in lora if "lora_B" in n)  # B starts at 0, A's gradient too
    others = graded - set(lora)
    if train_decoder:
        assert others and all(n.startswith("mask_decoder.") for n in others)
    else:
        assert not others, sorted(others)[:5]
    # the optimiser holds exactly what requires a gradient: adapters (+ decoder), in their block's layer
    groups = param_groups(model, 1e-3, 0.1, layer_decay=0.5)
    names = {n for g in groups for n in g["names"]}
    assert names == {n for n, p in model.named_parameters() if p.requires_grad}
    assert (names == set(lora)) is not train_decoder
    lr = {n: g["lr"] for g in groups for n in g["names"]}
    assert lr["image_encoder.blocks.0.attn.qkv.lora_A.default.weight"] == pytest.approx(1e-3 * 0.5**2)
    assert lr["image_encoder.blocks.1.mlp.fc2.lora_B.default.weight"] == pytest.approx(1e-3 * 0.5)
    opt, _ = SamOptim(lr=1e-3, warmup_iters=0)(model)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(names)


def _predict(predictor, image):
    predictor.set_image(image)
    point = np.array([[120.0, 80.0]])
    return predictor.predict(point_coords=point, point_labels=np.array([1]), multimask_output=True, return_logits=True)


def test_merged_export_gives_the_unmerged_outputs_in_the_official_package(tmp_path):
    import torch.distributed.checkpoint as dcp
    from segment_anything import SamPredictor as OfficialPredictor

    spec = {"rank": 4, "alpha": 8, "targets": ALL}
    torch.manual_seed(0)
    model = segany.build_sam("vit_tiny", lora=spec).eval()
    with torch.no_grad():  # trained-looking adapters (B starts at zero) and position tables
        for p in lora_parameters(model).values():
            p.copy_(torch.randn_like(p) * 0.05)
        enc = model.image_encoder
        for p in [enc.pos_embed] + [b.attn.rel_pos_h for b in enc.blocks] + [b.attn.rel_pos_w for b in enc.blocks]:
            p.copy_(torch.randn_like(p) * 0.02)
    image = make_test_image()
    ours = _predict(segany.SamPredictor(model), image)  # the unmerged model: W x + B A x * alpha / rank

    def official(path):
        sam = build_official_tiny_sam()
        sam.load_state_dict(torch.load(path, weights_only=True), strict=True)  # same keys, same shapes
        return _predict(OfficialPredictor(sam.eval()), image)

    segany.save_official(model, str(tmp_path / "saved.pth"))
    ref = official(tmp_path / "saved.pth")
    for a, b in zip(ours, ref):  # mask logits, IoU predictions, low-res logits
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)

    # without the adapters the outputs differ: the comparison above sees them
    sd = model.state_dict()
    bare = {k.replace(".base_layer.", "."): v for k, v in sd.items() if ".lora_" not in k}
    torch.save(segany.modeling.checkpoint.to_official(bare), tmp_path / "bare.pth")
    assert np.abs(official(tmp_path / "bare.pth")[0] - ref[0]).max() > 1e-2

    # train.py's checkpoints (Lightning file, FSDP directory) export to the same release file
    node = {"_target_": "segany.build_sam", "variant": "vit_tiny", "lora": spec}
    ckpt = {"state_dict": {"model." + k: v for k, v in sd.items()}, "global_step": 3, "segany_config": {"model": node}}
    torch.save(ckpt, tmp_path / "last.ckpt")
    d = tmp_path / "last_fsdp.ckpt"
    dcp.save({"state_dict": ckpt["state_dict"]}, checkpoint_id=str(d), no_dist=True)
    torch.save({"global_step": 3, "segany_config": {"model": node}}, d / "meta.pt")
    saved = torch.load(tmp_path / "saved.pth", weights_only=True)
    for src in (tmp_path / "last.ckpt", d):
        written = export(str(src), str(tmp_path / f"{src.stem}.pth"))
        assert written.keys() == saved.keys()
        assert all(torch.equal(written[k], saved[k]) for k in saved), src
    # evaluate.py / build_sam(checkpoint=) read a LoRA run merged: a plain SAM
    plain = segany.build_sam(checkpoint=str(tmp_path / "last.ckpt")).eval()
    assert not _adapted(plain)
    for a, b in zip(_predict(segany.SamPredictor(plain), image), ours):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
    evaluated, _ = load_model(str(d))  # evaluate.py's loader, on the FSDP directory
    assert evaluated.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in evaluated.state_dict().items())

    del node["lora"]  # adapters without their rank / alpha cannot be merged
    torch.save(ckpt, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match=r"bad.ckpt.*LoRA adapter weights.*no model.lora"):
        export(str(tmp_path / "bad.ckpt"), str(tmp_path / "bad.pth"))


def _fit(tmp_path, *overrides):
    import train

    cfg = compose(
        "lora=qkv",
        "model.lora.rank=2",
        "logger=csv",
        f"paths.root_dir={tmp_path}",
        "trainer.max_steps=2",
        "trainer.limit_val_batches=0",  # no validation: what is checked is the checkpoint
        "data.num_workers=0",
        f"data.root={tmp_path}/synthetic",
        "data.num_train=4",
        "data.num_val=2",
        "data.shard_size=4",
        "data.batch_size=2",
        "data.max_masks=2",
        "prompting.point_rounds=1",
        "prompting.mask_rounds=0",
        "optim.warmup_iters=0",
        "optim.cooldown=[]",  # a constant lr: the resumed step changes the adapters too
        "trainer.enable_progress_bar=false",
        "~callbacks.progress_bar",
        *overrides,
    )
    return cfg, train.train(cfg)


def test_lora_run_saves_adapters_and_resumes(tmp_path):
    import pytorch_lightning as pl

    cfg, _ = _fit(tmp_path)
    last = Path(cfg.paths.run_dir) / "checkpoints" / "last.ckpt"
    ck = torch.load(last, weights_only=True, map_location="cpu")
    assert ck["segany_config"]["model"]["lora"]["rank"] == 2
    pl.seed_everything(cfg.seed)
    init = instantiate(cfg.model)  # train.py's init: same seed, same weights
    sd = {k.removeprefix("model."): v for k, v in ck["state_dict"].items()}
    assert sd.keys() == init.state_dict().keys()
    lora = set(lora_parameters(init))
    frozen = [k for k in sd if k.startswith("image_encoder.") and k not in lora]
    assert all(torch.equal(sd[k], init.state_dict()[k]) for k in frozen)  # the encoder's own weights untouched
    assert all(sd[k].abs().sum() > 0 for k in lora if "lora_B" in k)  # the adapters trained (B started at 0)
    n_opt = sum(len(g["params"]) for g in ck["optimizer_states"][0]["param_groups"])
    assert n_opt == sum(p.requires_grad for p in init.parameters())

    _fit(tmp_path, "trainer.max_steps=3")  # same run dir: resumes from last.ckpt
    ck3 = torch.load(last, weights_only=True, map_location="cpu")
    assert ck3["global_step"] == 3
    assert all(torch.equal(ck3["state_dict"]["model." + k], sd[k]) for k in frozen)
    assert any(not torch.equal(ck3["state_dict"]["model." + k], sd[k]) for k in lora)

    out = tmp_path / "sam_lora.pth"
    export(str(last), str(out))
    plain = segany.build_sam(checkpoint=str(out))  # the architecture from the JSON beside it
    assert not _adapted(plain) and plain.config.img_size == cfg.model.img_size


def _fsdp_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from test_sharding import _data, _loss
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from segany.training.sharding import shard_sam

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",))
        model = _small({"rank": 2, "targets": ALL})
        model.mask_decoder.requires_grad_(False)  # adapters + prompt encoder train
        lora = set(lora_parameters(model))
        shard_sam(model, mesh=mesh["data_parallel"], param_dtype="bfloat16", activation_checkpointing=True)
        loss, _ = _loss(model, *_data(rank))
        loss.backward()
        params = {n.replace("_checkpoint_wrapped_module.", ""): p for n, p in model.named_parameters()}
        graded = {n for n, p in params.items() if p.grad is not None}
        assert lora <= graded and all(n in lora or n.startswith("prompt_encoder.") for n in graded), graded - lora
        before = {n: p.full_tensor().clone() for n, p in params.items()}
        torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
        changed = {n for n, p in params.items() if not torch.equal(before[n], p.full_tensor())}
        assert {n for n in changed if n.startswith("image_encoder.")} == lora
        sd = get_model_state_dict(model)
        dcp.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}}, checkpoint_id=os.path.join(out, "ckpt"))
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save(full, os.path.join(out, "full.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_trains_only_the_adapters_and_its_checkpoint_exports_merged(tmp_path):
    import torch.multiprocessing as mp
    from test_sharding import _free_port

    from segany.modeling.lora import LoraSpec, merge_lora

    mp.spawn(_fsdp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    spec = {"rank": 2, "alpha": 16, "targets": ALL}
    node = {"variant": "vit_tiny", "depth": 2, "global_attn_indexes": [1], "prompt_embed_dim": 64}
    node.update(decoder_mlp_dim=128, lora=spec)
    torch.save({"global_step": 1, "segany_config": {"model": node}}, tmp_path / "ckpt" / "meta.pt")
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    written = export(str(tmp_path / "ckpt"), str(tmp_path / "sam.pth"))
    merged = segany.modeling.checkpoint.to_official(merge_lora(full, LoraSpec(**spec)))
    assert written.keys() == merged.keys() and all(torch.equal(written[k], merged[k]) for k in merged)
