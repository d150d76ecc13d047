"""The trainer takes devices / num_nodes from the launcher (srun, torchrun) so that
Lightning's own checks pass on any allocation; global_batch is kept by accumulation;
trainer.accumulate_grad_batches can be given."""

from pathlib import Path

import pytest
from helpers import compose
from hydra.utils import instantiate

import train
from segany.utils.config import register_resolvers
from segany.utils.dist import Launch, launcher, topology

ROOT = Path(__file__).resolve().parents[1]
register_resolvers()

LAUNCH_VARS = ("TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE", "WORLD_SIZE", "RANK", "LOCAL_RANK", "GROUP_RANK")


@pytest.fixture
def no_launcher(monkeypatch):
    import os

    for k in list(os.environ):
        if k.startswith("SLURM_") or k in LAUNCH_VARS:
            monkeypatch.delenv(k)
    return monkeypatch


def slurm(mp, nodes, per_node, ntasks_per_node_var=True, job_name="segany"):
    mp.setenv("SLURM_NTASKS", str(nodes * per_node))
    mp.setenv("SLURM_NNODES", str(nodes))
    mp.setenv("SLURM_JOB_NUM_NODES", str(nodes))
    if ntasks_per_node_var:
        mp.setenv("SLURM_NTASKS_PER_NODE", f"{per_node}(x{nodes})" if nodes > 1 else str(per_node))
    mp.setenv("SLURM_JOB_NAME", job_name)
    mp.setenv("SLURM_JOB_ID", "77")
    mp.setenv("SLURM_NODELIST", f"node[1-{nodes}]")
    mp.setenv("SLURM_PROCID", "0")
    mp.setenv("SLURM_LOCALID", "0")
    mp.setenv("SLURM_NODEID", "0")


def torchrun(mp, nodes, per_node):
    mp.setenv("TORCHELASTIC_RUN_ID", "r1")
    mp.setenv("LOCAL_WORLD_SIZE", str(per_node))
    mp.setenv("WORLD_SIZE", str(nodes * per_node))
    for k in ("RANK", "LOCAL_RANK", "GROUP_RANK"):
        mp.setenv(k, "0")
    mp.setenv("MASTER_ADDR", "127.0.0.1")
    mp.setenv("MASTER_PORT", "29500")


def trainer_node(*overrides):
    """configs/trainer/default.yaml as train.yaml composes it (experiment-free: the demo's
    trainer=cpu swapped for default)."""
    return compose("trainer=default", *overrides)


def make_trainer(cfg, tmp_path):
    """The configured Trainer on CPU (Lightning's SLURM / torchelastic checks run at init)."""
    return instantiate(
        cfg.trainer,
        accelerator="cpu",
        precision="32-true",
        default_root_dir=str(tmp_path),
        logger=False,
        enable_checkpointing=False,
    )


def test_no_launcher_keeps_lightning_defaults(no_launcher):
    assert launcher() is None and topology() == (0, 1)
    cfg = trainer_node()
    assert cfg.trainer.devices == "auto" and cfg.trainer.num_nodes == 1
    demo = compose()  # trainer=cpu
    assert demo.trainer.devices == 1 and demo.trainer.accelerator == "cpu"
    no_launcher.setenv("SLURM_NTASKS", "8")  # salloc + an interactive shell: Lightning ignores SLURM
    no_launcher.setenv("SLURM_NTASKS_PER_NODE", "8")
    no_launcher.setenv("SLURM_JOB_NAME", "interactive")
    assert trainer_node().trainer.devices == "auto"
    no_launcher.setenv("SLURM_PROCID", "5")
    assert launcher() is None and topology() == (0, 1)  # the data and the evaluation ignore it too


@pytest.mark.parametrize("nodes,per_node,world,acc", [(4, 8, 32, 8), (1, 8, 8, 32), (2, 4, 8, 32), (32, 8, 256, 1)])
def test_slurm_allocation_sets_devices_and_nodes(no_launcher, tmp_path, nodes, per_node, world, acc):
    slurm(no_launcher, nodes, per_node)
    cfg = trainer_node("global_batch=256", "data.batch_size=1")
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (per_node, nodes)
    trainer = make_trainer(cfg, tmp_path)  # Lightning: devices == SLURM_NTASKS_PER_NODE, num_nodes == SLURM_NNODES
    assert type(trainer.strategy.cluster_environment).__name__ == "SLURMEnvironment"
    assert trainer.world_size == world == nodes * per_node
    assert topology() == (0, world)  # the data shards and the evaluation follow the same launcher
    train.apply_global_batch(cfg, trainer)
    assert trainer.accumulate_grad_batches == acc and world * acc == 256


def test_slurm_ntasks_only_and_cpu_trainer(no_launcher, tmp_path):
    slurm(no_launcher, 1, 2, ntasks_per_node_var=False)  # sbatch --ntasks=2 on one node
    assert launcher() == Launch("slurm", 0, 2, per_node=2, nodes=1)
    slurm(no_launcher, 2, 3)
    demo = compose()  # the CPU trainer follows srun too
    assert (demo.trainer.devices, demo.trainer.num_nodes) == (3, 2)
    assert make_trainer(demo, tmp_path).world_size == 6


@pytest.mark.parametrize("nodes,per_node,acc", [(1, 4, 8), (2, 4, 4), (3, 2, None)])
def test_torchrun_sets_devices_and_nodes(no_launcher, tmp_path, nodes, per_node, acc):
    torchrun(no_launcher, nodes, per_node)
    slurm(no_launcher, 1, 8)  # torchrun inside a SLURM job: torchrun wins, as in Lightning
    cfg = trainer_node("global_batch=64", "data.batch_size=2")
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (per_node, nodes)
    trainer = make_trainer(cfg, tmp_path)  # Lightning: devices x num_nodes == WORLD_SIZE
    assert type(trainer.strategy.cluster_environment).__name__ == "TorchElasticEnvironment"
    assert trainer.world_size == nodes * per_node
    assert topology() == (0, nodes * per_node)
    if acc is None:  # 2 per rank x 6 ranks = 12 does not divide 64
        with pytest.raises(ValueError, match="global_batch=64 cannot be met.*world size 6 = 12"):
            train.apply_global_batch(cfg, trainer)
    else:
        train.apply_global_batch(cfg, trainer)
        assert trainer.accumulate_grad_batches == acc and 2 * nodes * per_node * acc == 64


def test_torchrun_uneven_world_fails(no_launcher):
    torchrun(no_launcher, 1, 4)
    no_launcher.setenv("WORLD_SIZE", "6")
    with pytest.raises(ValueError, match="WORLD_SIZE=6 is not a multiple of LOCAL_WORLD_SIZE=4"):
        launcher()


def test_global_batch_logged_once_by_rank_zero(no_launcher, tmp_path, caplog):
    slurm(no_launcher, 2, 4)
    cfg = trainer_node("global_batch=256", "data.batch_size=2")
    trainer = make_trainer(cfg, tmp_path)
    with caplog.at_level("INFO", logger="train"):
        train.apply_global_batch(cfg, trainer)
    lines = [r.getMessage() for r in caplog.records if "global batch" in r.getMessage()]
    assert lines == ["global batch 256 = 2 per rank x 8 ranks x 16 accumulated (2 nodes x 4 devices, from slurm)"]
    no_launcher.setenv("SLURM_PROCID", "3")  # another rank says nothing
    caplog.clear()
    with caplog.at_level("INFO", logger="train"):
        train.apply_global_batch(cfg, make_trainer(cfg, tmp_path))
    assert not [r for r in caplog.records if "global batch" in r.getMessage()]


def test_accumulate_grad_batches_can_be_set(no_launcher, tmp_path):
    slurm(no_launcher, 1, 8)
    # before: "Key 'accumulate_grad_batches' is not in struct"
    cfg = trainer_node("global_batch=256", "data.batch_size=1", "trainer.accumulate_grad_batches=32")
    assert cfg.trainer.accumulate_grad_batches == 32
    trainer = make_trainer(cfg, tmp_path)
    train.apply_global_batch(cfg, trainer)
    assert trainer.accumulate_grad_batches == 32
    cfg = trainer_node("global_batch=256", "data.batch_size=1", "trainer.accumulate_grad_batches=16")
    with pytest.raises(ValueError, match="accumulate_grad_batches=16 contradicts global_batch=256"):
        train.apply_global_batch(cfg, make_trainer(cfg, tmp_path))
    cfg = trainer_node("trainer.accumulate_grad_batches=4")  # no global_batch: taken as given
    trainer = make_trainer(cfg, tmp_path)
    train.apply_global_batch(cfg, trainer)
    assert trainer.accumulate_grad_batches == 4
    cfg = trainer_node()
    assert "accumulate_grad_batches" in cfg.trainer and cfg.trainer.accumulate_grad_batches is None  # null
    trainer = make_trainer(cfg, tmp_path)
    train.apply_global_batch(cfg, trainer)
    assert trainer.accumulate_grad_batches == 1
