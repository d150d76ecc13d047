"""segany.utils.dist.topology: where rank and world size come from."""

import pytest

from segany.utils.dist import topology

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS")


class FakeTrainer:
    global_rank, world_size = 3, 8


@pytest.fixture
def env(monkeypatch):
    for k in LAUNCHER_VARS:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_alone_it_is_rank_0_of_1(env):
    assert topology() == (0, 1)


def test_torchrun_then_slurm_environment(env):
    env.setenv("SLURM_PROCID", "5")
    env.setenv("SLURM_NTASKS", "16")
    assert topology() == (5, 16)
    env.setenv("RANK", "2")
    env.setenv("WORLD_SIZE", "4")  # torchrun inside a SLURM allocation: torchrun's numbering
    assert topology() == (2, 4)


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
