"""FSDP2 sharding of SAM on 2 CPU processes (gloo): bf16 compute with fp32 reduction and
activation checkpointing gives the unsharded fp32 model's gradients; a DCP checkpoint
exports to the release format and loads into `segment_anything`.

The two ranks are spawned with torch.multiprocessing (fresh interpreters); rank 0 writes
what the test process checks into a temporary directory.
"""

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import segany
from segany.modeling.checkpoint import to_official
from segany.training.sharding import ShardingConfig, _dtype, is_sharded, shard_sam

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(rank: int):
    """Per-rank input: one 256 px image, 3 prompts of 2 points each, 64x64 targets."""
    g = torch.Generator().manual_seed(100 + rank)
    image = torch.randn(1, 3, 256, 256, generator=g)
    coords = torch.rand(3, 2, 2, generator=g) * 256
    labels = torch.randint(0, 2, (3, 2), generator=g)
    target = torch.rand(3, 1, 64, 64, generator=g) > 0.5
    return image, coords, labels, target


def _loss(model, image, coords, labels, target):
    """Encoder once, then two decoder rounds (the second fed the first's logits), as the
    training simulation does; multimask + single-mask heads both used."""
    emb = model.image_encoder(image)
    pe = model.prompt_encoder.get_dense_pe()
    sparse, dense = model.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    masks, iou = model.mask_decoder.predict_masks(emb, pe, sparse, dense)  # (3, 4, 64, 64)
    loss = F.binary_cross_entropy_with_logits(masks[:, :1].float(), target.float()) + iou.float().square().mean()
    sparse, dense = model.prompt_encoder(points=(coords, labels), boxes=None, masks=masks[:, :1].detach())
    masks2, iou2 = model.mask_decoder(emb, pe, sparse, dense, multimask_output=True)  # (3, 3, 64, 64)
    loss = loss + F.binary_cross_entropy_with_logits(masks2.float(), target.float().expand_as(masks2))
    return loss, masks.dtype


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",))
        torch.manual_seed(0)
        ref = segany.build_sam("vit_tiny")  # unsharded fp32 reference, same init on every rank
        ref_losses = [_loss(ref, *_data(r))[0] for r in range(world)]
        torch.stack(ref_losses).mean().backward()  # = what FSDP's gradient averaging must give
        ref_grads = {n: p.grad for n, p in ref.named_parameters()}
        n_full = sum(p.numel() for p in ref.parameters())

        def sharded(param_dtype):
            model = copy.deepcopy(ref)
            model.zero_grad(set_to_none=True)
            shard_sam(
                model,
                mesh=mesh["data_parallel"],
                param_dtype=param_dtype,
                reduce_dtype="float32",
                activation_checkpointing=True,
            )
            loss, out_dtype = _loss(model, *_data(rank))
            assert out_dtype == torch.float32  # decoder outputs fp32 logits (output_dtype)
            loss.backward()
            names = dict(model.named_parameters())
            grads = {n: p.grad.full_tensor() for n, p in names.items()}
            assert all(torch.isfinite(g).all() for g in grads.values())
            errs = {n: (g - ref_grads[n.replace("_checkpoint_wrapped_module.", "")]) for n, g in grads.items()}
            ref_norm = torch.cat([g.flatten() for g in ref_grads.values()]).norm()
            total = torch.cat([e.flatten() for e in errs.values()]).norm() / ref_norm
            worst = max(
                (
                    e.norm().item()
                    / max(
                        ref_grads[n.replace("_checkpoint_wrapped_module.", "")].norm().item(), 1e-2 * ref_norm.item()
                    ),
                    n,
                )
                for n, e in errs.items()
            )
            return model, loss, total.item(), worst

        # fp32 parameters: FSDP mechanics (units, AC recompute, two decoder calls, averaging) exact
        _, loss32, total, worst = sharded("float32")
        assert abs(loss32.item() - ref_losses[rank].item()) < 1e-5 * abs(ref_losses[rank].item())
        assert total < 1e-4 and worst[0] < 1e-3, (total, worst)
        # bf16 parameters, fp32 reduction: the training setting; bf16 tolerance
        model, loss, total, worst = sharded("bfloat16")
        if rank == 0:
            print(f"bf16 vs fp32 gradients: relative error {total:.4f} overall, worst {worst[0]:.3f} ({worst[1]})")
        assert torch.isfinite(loss) and abs(loss.item() - ref_losses[rank].item()) < 2e-2 * abs(ref_losses[rank].item())
        assert total < 0.1 and worst[0] < 0.3, (total, worst)  # bf16 rounding; unrelated gradients: ~1.4

        assert is_sharded(model)
        assert all(isinstance(b, CheckpointWrapper) for b in model.image_encoder.blocks)
        names = dict(model.named_parameters())
        for name, p in names.items():
            assert isinstance(p, DTensor), name
            assert p.device_mesh.size() == world and p.placements == (Shard(0),), name
            assert p.dtype == torch.float32, name  # sharded master weights stay fp32
        n_local = sum(p.to_local().numel() for p in names.values())
        assert n_local < 0.55 * n_full, (n_local, n_full)

        before = {n: p.full_tensor().clone() for n, p in names.items()}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        opt.step()
        opt.zero_grad()
        changed = sum(not torch.equal(before[n], p.full_tensor()) for n, p in names.items())
        assert changed > 0.9 * len(names)
        assert all(torch.isfinite(p.to_local()).all() for p in names.values())

        # second step: sharded state still trains (losses agree across ranks' reductions)
        loss2, _ = _loss(model, *_data(rank))
        loss2.backward()
        opt.step()
        losses = [torch.zeros(()) for _ in range(world)]
        dist.all_gather(losses, loss2.detach().float())
        assert all(torch.isfinite(x) for x in losses)

        # a Lightning-style sharded checkpoint: {"state_dict": {"model.<fqn>": DTensor}, "optimizer_0": ...}
        sd = get_model_state_dict(model)
        assert not any("_checkpoint_wrapped_module" in k for k in sd)
        dcp.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}}, checkpoint_id=os.path.join(out, "ckpt"))
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save(full, os.path.join(out, "full.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_sharding_config_rejects_bad_dtypes():
    assert _dtype("bf16") is torch.bfloat16 and _dtype("float32") is torch.float32 and _dtype(None) is None
    with pytest.raises(ValueError, match="bfloat17"):
        ShardingConfig(param_dtype="bfloat17")


def test_fsdp2_two_ranks_matches_fp32_and_exports(tmp_path):
    import torch.multiprocessing as mp

    try:
        from _official import build_official_tiny_sam
    except ImportError:
        from tests._official import build_official_tiny_sam

    mp.spawn(_worker, args=(WORLD, _free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ckpt = tmp_path / "ckpt"
    assert (ckpt / ".metadata").is_file() and len(list(ckpt.glob("*.distcp"))) == WORLD

    out = tmp_path / "sam.pth"
    r = subprocess.run(
        [sys.executable, "-m", "segany.export", str(ckpt), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    exported = torch.load(out, map_location="cpu", weights_only=True)
    full = to_official(torch.load(tmp_path / "full.pt", map_location="cpu", weights_only=True))
    assert exported.keys() == full.keys()
    for k in full:
        assert exported[k].dtype == torch.float32 and torch.equal(exported[k], full[k].float()), k

    official = build_official_tiny_sam()
    official.load_state_dict(exported, strict=True)
    for k, v in official.state_dict().items():
        assert torch.equal(v, full[k]), k


def test_strategy_configs_compose_and_instantiate(monkeypatch):
    from helpers import compose
    from hydra.utils import instantiate
    from pytorch_lightning.strategies import DDPStrategy, ModelParallelStrategy

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "256")
    fsdp = compose("experiment=vit_h_sa1b")  # the recipe includes strategy/fsdp
    ddp = compose("experiment=vit_b_sa1b", "strategy=ddp")
    s = instantiate(fsdp.trainer.strategy)
    assert isinstance(s, ModelParallelStrategy)
    assert s._data_parallel_size == 256 and s._tensor_parallel_size == 1 and s._save_distributed_checkpoint
    cfg = instantiate(fsdp.module.sharding)
    assert isinstance(cfg, ShardingConfig)
    # precision=auto (the recipe's): bf16 where this machine has bf16 units, fp32 parameters otherwise
    expected = "bf16" if str(fsdp.trainer.precision).startswith("bf16") else None
    assert cfg.param_dtype == expected and cfg.reduce_dtype == "float32" and cfg.activation_checkpointing
    assert instantiate(compose("experiment=vit_h_sa1b", "precision=bf16").module.sharding).param_dtype == "bf16"
    assert fsdp.trainer.max_steps == 90000  # the experiment is untouched
    s = instantiate(ddp.trainer.strategy)
    assert isinstance(s, DDPStrategy) and ddp.module.sharding is None
