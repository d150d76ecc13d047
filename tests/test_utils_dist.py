"""segany.utils.dist.topology / launcher: where rank and world size come from."""

import pytest

from segany.utils.dist import Launch, launcher, topology

LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "TORCHELASTIC_RUN_ID",
    "LOCAL_WORLD_SIZE",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_NTASKS_PER_NODE",
    "SLURM_NNODES",
    "SLURM_JOB_NUM_NODES",
    "SLURM_JOB_NAME",
)


class FakeTrainer:
    global_rank, world_size = 3, 8


@pytest.fixture
def env(monkeypatch):
    for k in LAUNCHER_VARS:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_alone_it_is_rank_0_of_1(env):
    assert topology() == (0, 1)


def test_torchrun_then_slurm_then_plain_rank_and_world_size(env):
    env.setenv("RANK", "2")
    env.setenv("WORLD_SIZE", "4")  # env:// alone (no launcher Lightning knows)
    assert topology() == (2, 4) and launcher() == Launch("env", 2, 4)
    env.setenv("SLURM_PROCID", "5")
    env.setenv("SLURM_NTASKS", "16")
    env.setenv("SLURM_NNODES", "2")
    assert topology() == (5, 16) and launcher() == Launch("slurm", 5, 16, per_node=8, nodes=2)
    env.setenv("TORCHELASTIC_RUN_ID", "r1")
    env.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun inside a SLURM allocation: torchrun's numbering
    assert topology() == (2, 4) and launcher() == Launch("torchrun", 2, 4, per_node=2, nodes=2)


def test_an_interactive_slurm_shell_is_no_launcher(env):
    """salloc + a shell: Lightning runs its own processes, so the ranks are not SLURM's."""
    env.setenv("SLURM_PROCID", "0")
    env.setenv("SLURM_NTASKS", "8")
    for name in ("bash", "interactive"):
        env.setenv("SLURM_JOB_NAME", name)
        assert launcher() is None and topology() == (0, 1)
    env.setenv("SLURM_JOB_NAME", "train")
    assert topology() == (0, 8)


def test_the_trainer_comes_before_the_environment_and_explicit_values_before_both(env):
    env.setenv("RANK", "1")
    env.setenv("WORLD_SIZE", "2")
    assert topology(trainer=FakeTrainer()) == (3, 8)
    assert topology(6, trainer=FakeTrainer()) == (6, 8)
    assert topology(0, 1, trainer=FakeTrainer()) == (0, 1)
    assert topology(world_size=3) == (1, 3)


def test_a_rank_outside_the_world_is_refused(env):
    env.setenv("RANK", "4")
    env.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="rank=4 is not in a world of 4"):
        topology()
