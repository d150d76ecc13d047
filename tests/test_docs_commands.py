"""Docs are tests: every train.py / evaluate.py / sbatch / `python -m segany.*` command shown in
README.md, experiments/*.md, slurm/*.md, slurm/train.sbatch and configs/**/*.yaml comments is run
through bash as written and checked (tests/doc_commands.py says how):

- train.py / evaluate.py: the config composes as `python <script> <args> --cfg job` would compose it
  (each job of a -m sweep), train.py's config resolves, a {a..b} shard range reaches the config
  unexpanded, and train.py's own first check (check_train_config) passes;
- sbatch: slurm/train.sbatch runs with srun recorded; the train.py command it would start, as above;
- python -m segany.*: argparse accepts the arguments.

Two commands also go through real `python train.py ... --cfg job` / `python evaluate.py ... --cfg job`
subprocesses, whose printed YAML must equal the in-process composition (the in-process check is
faithful). Nothing trains.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import doc_commands as dc
import pytest
import yaml

from segany.training.config import check_train_config

ROOT = Path(__file__).resolve().parents[1]
SNIPPETS, COMMANDS = dc.find(ROOT)
MIN_COMMANDS = 110  # 123 command lines (125 commands) in the docs when written; fewer means the finder lost some


def _has_submitit() -> bool:
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    return dc.run_snippets(SNIPPETS, tmp_path_factory.mktemp("docs"))


def _records(ran, cmd: dc.DocCommand):
    recs = ran.records[cmd.snippet]
    return [r for r in recs if cmd.line <= r.line <= cmd.last_line and r.kind]


def _check_hydra(script: str, args: list, doc_text: str, env=None) -> tuple[list, list]:
    """(errors, skip reasons) of one train.py / evaluate.py argv."""
    try:
        # train.py resolves its whole config before building; evaluate.py reads only what it uses
        jobs = dc.compose_jobs(ROOT, script, args, env=env, resolve=script == "train.py")
    except Exception as e:  # noqa: BLE001 - the message is the test's output
        return [f"{script} {' '.join(args)}: {type(e).__name__}: {e}"], []
    errors = []
    for job, cfg, hydra_cfg in jobs:
        errors += [f"{script} {' '.join(job)}: {e}" for e in dc.check_ranges(doc_text, job, cfg)]
        if script == "train.py":  # train.py's first step: fails before anything is built, naming the key
            try:
                check_train_config(cfg)
            except ValueError as e:
                errors.append(f"{script} {' '.join(job)}: {e}")
    skips = []
    launcher = str(jobs[0][2].launcher.get("_target_", ""))
    if "submitit" in launcher and not _has_submitit():
        skips.append(
            f"composed ({len(jobs)} jobs); launching needs hydra-submitit-launcher (pip install -e '.[slurm]')"
        )
    return errors, skips


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.id for c in COMMANDS])
def test_doc_command(cmd, ran, tmp_path):
    assert "..." not in cmd.code and not any(c in cmd.code for c in "<>"), (
        f"{cmd.id}: not pasteable as written (write placeholders as UPPER_CASE words): {cmd.text}"
    )
    recs = _records(ran, cmd)
    got = dc.Counter("sbatch" if r.kind == "sbatch" else r.kind for r in recs)
    missing = {k: n for k, n in cmd.kinds.items() if got[k] < n}
    assert not missing, (
        f"{cmd.id}: bash did not run {dict(missing)} of: {cmd.text}\n{ran.stderr[cmd.snippet].strip()[-800:]}"
    )
    errors, skips = [], []
    for r in recs:
        if r.kind in ("train.py", "evaluate.py"):
            e, s = _check_hydra(r.kind, r.argv[1:], cmd.text)
        elif r.kind == "sbatch":
            try:
                runs = dc.sbatch_train_argvs(ROOT, r, tmp_path)
            except Exception as ex:  # noqa: BLE001
                errors.append(f"sbatch {' '.join(r.argv)}: {ex}")
                continue
            e, s = [], []
            for args, env in runs:
                e2, s2 = _check_hydra("train.py", args, cmd.text, env=env)
                e, s = e + e2, s + s2
        else:
            msg = dc.check_argparse(r.kind, r.argv[2:])
            e, s = ([f"python -m {r.kind} {' '.join(r.argv[2:])}: {msg}"] if msg else []), []
        errors += e
        skips += s
    assert not errors, f"{cmd.id}: {cmd.text}\n" + "\n".join(errors)
    if skips:
        pytest.skip(f"{cmd.id}: " + "; ".join(sorted(set(skips))))


def test_commands_checked_count(ran):
    n = sum(len([r for r in recs if r.kind]) for recs in ran.records.values())
    print(f"\ndocs: {len(COMMANDS)} command lines, {n} commands checked, {len(SNIPPETS)} snippets")
    assert len(COMMANDS) >= MIN_COMMANDS, f"only {len(COMMANDS)} command lines found in the docs"
    assert n >= len(COMMANDS)


def test_finder_sees_what_bash_sees():
    """The finder against hand-written docs: block continuation, && chain, for loop, inline code,
    a yaml comment, an sbatch script comment; prose and non-shell blocks ignored."""
    md = (
        "Run `python train.py experiment=demo` or `pip install x`.\n\n"
        "```bash\n"
        "pip install -e . && python train.py \\\n    trainer.max_steps=2 && python evaluate.py checkpoint=CKPT\n"
        "for lr in 1 2; do sbatch --nodes=2 slurm/train.sbatch optim.lr=$lr; done\n"
        "```\n\n```python\nimport os  # python train.py x=1\n```\n"
    )
    snips = dc.markdown_snippets("x.md", md)
    assert [(s.line, s.text) for s in snips][0] == (1, "python train.py experiment=demo")
    assert snips[1].line == 4 and len(snips) == 2
    cmds = []
    for k, s in enumerate(snips):
        cmds += [(s.line + a, line) for a, _, line in dc.logical_lines(s.text) if dc.COMMAND.search(line)]
    assert [c[0] for c in cmds] == [1, 4, 6]
    yml = "a: 1   # python train.py -m a=1,2 # two jobs\n#SBATCH --nodes=1\n# sbatch copies this script\n"
    assert [s.text for s in dc.comment_snippets("c.yaml", yml)] == ["python train.py -m a=1,2 # two jobs"]


def test_bash_records_argv_as_bash_passes_it(tmp_path):
    """Quoting, continuation lines and loops are bash's: the recorded argv is what a program gets."""
    text = "python train.py \\\n  'data.train_shards=\"/d/sa_{000000..000002}.tar\"' x=sa_{0..1}\n"
    text += "for i in 1 2; do python evaluate.py n=$i; done\n"
    res = dc.run_snippets([dc.Snippet("x.md", 10, text)], tmp_path)
    recs = res.records[0]
    assert [r.line for r in recs] == [10, 12, 12]
    assert recs[0].argv == ["train.py", 'data.train_shards="/d/sa_{000000..000002}.tar"', "x=sa_0", "x=sa_1"]
    assert [r.argv for r in recs[1:]] == [["evaluate.py", "n=1"], ["evaluate.py", "n=2"]]


def test_ranges_must_arrive_unexpanded():
    """The range check fails both ways a range can be lost (bash expanded it / config lost it)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"data": {"train_shards": "/d/sa_{000000..000999}.tar"}})
    text = "python train.py 'data.train_shards=\"/d/sa_{000000..000999}.tar\"'"
    assert dc.check_ranges(text, ['data.train_shards="/d/sa_{000000..000999}.tar"'], cfg) == []
    assert "bash expanded" in dc.check_ranges(text, ["data.train_shards=/d/sa_000000.tar"], cfg)[0]
    lost = OmegaConf.create({"data": {"train_shards": "/d/sa_000000.tar"}})
    assert "lost the range" in dc.check_ranges(text, ['data.train_shards="/d/sa_{000000..000999}.tar"'], lost)[0]


def test_sbatch_runs_the_script_with_the_allocation(tmp_path):
    """slurm/train.sbatch itself turns an sbatch line into the train.py argv (read from the script,
    not re-implemented): the doc's overrides arrive in order and unchanged."""
    rec = dc.Record(1, str(tmp_path), "", "sbatch", ["--nodes=2", "slurm/train.sbatch", "experiment=vit_b_sa1b"])
    ((args, env),) = dc.sbatch_train_argvs(ROOT, rec, tmp_path)
    assert args[0] == "experiment=vit_b_sa1b"
    assert env["SLURM_NNODES"] == "2"


def test_argparse_check_rejects_unknown_flags():
    assert dc.check_argparse("segany.export", ["in.ckpt", "out.pth"]) is None
    assert "unrecognized arguments" in dc.check_argparse("segany.export", ["in.ckpt", "out.pth", "--nope"])


def _first(ran, script: str, need: str):
    """The first doc command running `script` (not a sweep) whose text contains `need`."""
    for c in COMMANDS:
        for r in _records(ran, c):
            if r.kind == script and need in c.text and not {"-m", "--multirun"} & set(r.argv):
                return c, r.argv[1:]
    pytest.fail(f"no {script} command with {need!r} in the docs")


def test_in_process_composition_equals_cfg_job(ran):
    """Real `python train.py <args> --cfg job` and `python evaluate.py <args> --cfg job` (run at
    the same time) print the configs the in-process check composed."""
    from omegaconf import OmegaConf

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PYTHONPATH"] = str(ROOT)
    runs = []
    for script, need in (("train.py", "{"), ("evaluate.py", "checkpoint=")):
        cmd, args = _first(ran, script, need)
        p = subprocess.Popen(
            [sys.executable, script, *args, "--cfg", "job"],
            cwd=ROOT,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        runs.append((script, cmd, args, p))
    for script, cmd, args, p in runs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, f"{cmd.id}: {err[-2000:]}"
        ((_, cfg, _),) = dc.compose_jobs(ROOT, script, args, env={}, resolve=False)
        assert yaml.safe_load(out) == OmegaConf.to_container(cfg), cmd.id
