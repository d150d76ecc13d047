"""Helpers shared by the tests (importable as ``from helpers import ...``: tests/ is on pytest's pythonpath)."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir

from segany.utils.config import register_resolvers

ROOT = Path(__file__).resolve().parents[1]


def run_train(*overrides: str, expect_rc: int = 0, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python train.py *overrides` in a subprocess from the repository root (wandb offline, full
    Hydra errors, one thread), its exit status checked against `expect_rc`."""
    env = dict(os.environ, WANDB_MODE="offline", HYDRA_FULL_ERROR="1", OMP_NUM_THREADS="1")
    p = subprocess.run(
        [sys.executable, "train.py", *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert p.returncode == expect_rc, (p.returncode, p.stdout[-2000:], p.stderr[-4000:])
    return p


def compose(*overrides: str, name: str = "train", return_hydra_config: bool = False):
    """configs/<name>.yaml composed with `overrides`, with segany's resolvers registered (as
    train.py / evaluate.py do)."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose(name, overrides=list(overrides), return_hydra_config=return_hydra_config)


def write_run_checkpoint(run_dir: Path, seed: int = 0) -> Path:
    """run_dir/checkpoints/last.ckpt as train.py writes it (Lightning format with the model
    config): a vit_tiny initialised from `seed`."""
    import segany

    torch.manual_seed(seed)
    model = segany.build_sam("vit_tiny")
    (Path(run_dir) / "checkpoints").mkdir(parents=True)
    path = Path(run_dir) / "checkpoints" / "last.ckpt"
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "global_step": 1,
            "segany_config": {"model": {"_target_": "segany.build_sam", "variant": "vit_tiny"}},
        },
        path,
    )
    return path


@torch.no_grad()
def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter and every state-carrying buffer random (BatchNorm running stats included), for the
    light-encoder parity tests; TinyViT's attention-bias index buffers (derived from the window) are kept."""
    g = torch.Generator().manual_seed(seed)
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if name.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        elif name.endswith("num_batches_tracked"):
            t.fill_(int(torch.randint(1, 1000, (), generator=g)))
        elif name.endswith("attention_bias_idxs") or name.endswith(".ab"):
            continue  # derived from the window size
        elif name.endswith("attention_biases"):
            t.copy_(torch.randn(t.shape, generator=g))
        elif t.ndim == 1 and name.endswith("weight"):  # BatchNorm / LayerNorm scale
            t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
        elif t.ndim == 1:  # biases, running means
            t.copy_(0.2 * torch.randn(t.shape, generator=g))
        else:  # conv / linear weights, fan-in scaled
            t.copy_(torch.randn(t.shape, generator=g) / t[0].numel() ** 0.5)


def image(img_size: int, batch: int = 2) -> torch.Tensor:
    """A seeded (batch, 3, img_size, img_size) normal image."""
    return torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))
