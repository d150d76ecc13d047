"""Command-line checks run before Hydra parses anything (train.py, evaluate.py), and the
checkpoint flags of the argparse tools.

Hydra keeps the last of several overrides of one key without a word. The usual way to get
several is the shell: an unquoted brace range such as
``data.train_shards=/datasets/sa1b/sa_{000000..000999}.tar`` is expanded by bash into 1000
words, and the run would train on the last shard only. So a key given more than once is an
error, named, before anything starts.

A renamed key (`RENAMED`) given under its old spelling is an error naming the new one, before
Hydra would reject it as unknown (or, for a key still in the config, silently accept it).
The argparse tools take `--checkpoint PATH` / `--trust-checkpoint` (`add_checkpoint_args`);
their old `--ckpt` fails the same way.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Optional, Sequence

from segany.utils.precision import PRECISIONS

# the overrides Lightning appends when it re-launches the script for DDP ranks 1..n-1
# (lightning_fabric/strategies/launchers/subprocess_script.py, _hydra_subprocess_cmd); they may
# repeat keys the user set, and the user's part was already checked in rank 0
_LIGHTNING_RELAUNCH = ("hydra.run.dir=", "hydra.job.name=train_ddp_process_", "hydra.output_subdir=null")


def override_key(arg: str):
    """The key an override sets (`key=v`, `+key=v`, `++key=v`, `~key`, `~key=v` all set `key`),
    or None for what is not an override (`-m`, `--cfg`, the value of a flag such as `job`)."""
    if arg.startswith("-"):
        return None
    if arg.startswith("~"):
        return arg[1:].split("=", 1)[0] or None
    if "=" not in arg:
        return None
    return re.sub(r"^\+\+?", "", arg.split("=", 1)[0]) or None


# old spelling (as typed, `+` included where the key had to be added) -> the new one
RENAMED = {
    "ckpt_path": "checkpoint",
    "ckpt_trust": "trust_checkpoint",
    "+model.trust_checkpoint": "model.trust_checkpoint",  # in every configs/model/*.yaml: no + needed
    "trainer.precision": "precision",
    # evaluate.py: the points task's settings under points: like every other task's
    **{k: f"points.{k}" for k in ("clicks", "multimask_first", "use_prev_mask", "first_click", "baselines")},
}


def renamed(args: Sequence[str]) -> list[str]:
    """One line per override in `args` that uses an old spelling of `RENAMED`, naming the new one."""
    lines = []
    for arg in args:
        key = override_key(arg)
        typed = arg.split("=", 1)[0].lstrip("~")
        old = typed if typed in RENAMED else key if key in RENAMED else None
        if old is not None:
            lines.append(f"  {arg!r}: {old} is now {RENAMED[old]}")
    return lines


def _is_lightning_relaunch(args: Sequence[str]) -> bool:
    tail = list(args[-3:])
    return len(tail) == 3 and all(a.startswith(p) for a, p in zip(tail, _LIGHTNING_RELAUNCH))


def check_overrides(args: Sequence[str]) -> None:
    """Fail (message on stderr, SystemExit with status 2) when a key is overridden more than
    once in `args` (sys.argv[1:]), or under an old spelling. A multirun sweep `key=a,b` is one
    override."""
    args = list(args)
    if _is_lightning_relaunch(args):
        args = args[:-3]
    old = renamed(args)
    if old:
        sys.stderr.write("error: renamed config key(s) on the command line:\n" + "\n".join(old) + "\n")
        raise SystemExit(2)
    seen: dict[str, list[str]] = {}
    for arg in args:
        key = override_key(arg)
        if key is not None:
            seen.setdefault(key, []).append(arg)
    repeated = {k: v for k, v in seen.items() if len(v) > 1}
    if not repeated:
        return
    lines = []
    for key, given in repeated.items():
        shown = f"{given[0]!r} ... {given[-1]!r}" if len(given) > 2 else " and ".join(repr(g) for g in given)
        lines.append(f"  {key} is given {len(given)} times ({shown}); Hydra would keep only the last")
    key = next((k for k, g in repeated.items() if _looks_expanded(g)), None)
    if key is not None:
        given = repeated[key]
        name, first = given[0].split("=", 1)
        hint = (
            "An unquoted {a..b} range expanded by the shell? Quote it, single quotes for bash and double "
            f"quotes for Hydra:\n  '{name}=\"{_as_range(first, given[-1].split('=', 1)[1])}\"'\n"
            "or give a directory of shards or a list file (one shard per line) instead."
        )
    else:
        hint = "Give each key once."
    sys.stderr.write(
        "error: a key is set more than once on the command line:\n" + "\n".join(lines) + "\n" + hint + "\n"
    )
    raise SystemExit(2)


def _looks_expanded(given: list) -> bool:
    """Overrides that differ only in their numbers, spelled alike, three or more of them or
    with more than a number as value: what bash makes of `key=x_{0..9}.tar`."""
    masked = {re.sub(r"\d+", "#", g) for g in given}
    value = given[0].split("=", 1)[-1]
    return len(masked) == 1 and len(set(given)) > 1 and (len(given) > 2 or not value.isdigit())


def _as_range(first: str, last: str) -> str:
    """The brace range bash expanded into first ... last (e.g. sa_000000.tar ... sa_000003.tar ->
    sa_{000000..000003}.tar); a generic example when they differ in more than one number."""
    a, b = re.split(r"(\d+)", first), re.split(r"(\d+)", last)
    diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    if len(a) != len(b) or len(diff) != 1:
        return "/datasets/sa1b/sa_{000000..000999}.tar"
    i = diff[0]
    return "".join(a[:i]) + "{" + a[i] + ".." + b[i] + "}" + "".join(a[i + 1 :])


class _Renamed(argparse.Action):
    """A flag that was renamed: giving it (with or without a value) is an error naming the new one."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        super().__init__(option_strings, argparse.SUPPRESS, nargs="?", default=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} was renamed: use {self.new}")


def add_checkpoint_args(parser: argparse.ArgumentParser, path_help: Optional[str] = None) -> None:
    """`--checkpoint PATH` (when `path_help` is given; default None) and `--trust-checkpoint`, the
    spelling every command line uses; the old `--ckpt` is refused naming `--checkpoint`. It is
    an option of its own, so argparse's prefix matching cannot take it for another flag."""
    if path_help is not None:
        parser.add_argument("--checkpoint", default=None, help=path_help)
        parser.add_argument("--ckpt", action=_Renamed, new="--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="unpickle arbitrary Python objects in the checkpoint (only for a file you trust)",
    )


def add_precision_arg(parser: argparse.ArgumentParser) -> None:
    """`--precision fp32|bf16|auto` (segany/utils/precision.py), fp32 by default: the spelling of
    every inference command line."""
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=PRECISIONS,
        help="fp32 (the release's masks), bf16 (torch.autocast) or auto (bf16 where the device has bf16 units)",
    )
