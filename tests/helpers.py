"""Helpers shared by the tests (importable as ``from helpers import ...``: tests/ is on pytest's pythonpath)."""

from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir

from segany.utils.config import register_resolvers

ROOT = Path(__file__).resolve().parents[1]


def compose(*overrides: str, name: str = "train", return_hydra_config: bool = False):
    """configs/<name>.yaml composed with `overrides`, with segany's resolvers registered (as
    train.py / evaluate.py do)."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose(name, overrides=list(overrides), return_hydra_config=return_hydra_config)
