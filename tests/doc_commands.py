"""The commands the docs show, found and checked without running anything heavy
(tests/test_docs_commands.py).

Found: every `python train.py ...`, `python evaluate.py ...`, `python -m segany.<module> ...` and
`sbatch ... slurm/train.sbatch ...` in README.md, experiments/*.md, slurm/*.md (bash code blocks and
inline code), in the comments of slurm/train.sbatch and of configs/**/*.yaml.

Run through bash as written: each code block, inline span or comment is a bash script run by
``bash`` with ``python`` and ``sbatch`` defined as shell functions that only record the argv bash
hands them (and the line they were called from), and an empty PATH, so every other external
command (pip, cd targets aside) is a no-op. Quoting, brace expansion, ``\\`` continuations, ``&&``
chains, ``for`` loops and comments are therefore bash's own, not a re-implementation.

Checked, per recorded command:
  train.py / evaluate.py  composed in-process with Hydra's compose API from the argv bash produced,
                          as ``python <script> <args> --cfg job`` would compose it (a ``-m`` sweep
                          is split into its jobs with Hydra's BasicSweeper, each job composed);
                          train.py's config is then resolved (train.py resolves it all). A
                          ``{a..b}`` range typed in the command must reach the config unexpanded.
  sbatch                  slurm/train.sbatch itself runs under bash with the SLURM variables of the
                          requested allocation and ``srun`` replaced by a recorder; the train.py
                          argv it would start is then checked as above.
  python -m segany.X      the module runs as ``__main__`` with the argv until argparse has parsed
                          it (its flags and types checked), then stops; no arguments: --help.

Placeholders: UPPER_CASE words (SA1B_DIR, COCO_DIR, CKPT, ...) stand for the user's own paths and
values; they are plain strings to bash and Hydra, and nothing here opens them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import runpy
import subprocess
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

# a command the docs test checks: the programs below, as typed in the docs
COMMAND = re.compile(
    r"(?<![\w./-])(?:python3? (?P<script>train\.py|evaluate\.py)(?![\w.])"
    r"|python3? -m (?P<module>segany(?:\.\w+)*)"
    r"|(?P<sbatch>sbatch)\b[^\n`]*?slurm/train\.sbatch)"
)
RANGE = re.compile(r"\{\d+\.\.\d+\}")  # a shard range, e.g. {000000..000999}
SHELLS = {"", "bash", "sh", "shell", "console"}

_PREAMBLE = r"""
__rec() { local line=${BASH_LINENO[1]}; local prog=$1; shift
          printf '%s\0' "@@REC" "$line" "$PWD" "${SWEEP-}" "$prog" "$#" "$@" >> "$__DOCS_OUT"; }
python() { __rec python "$@"; }
python3() { __rec python "$@"; }
sbatch() { __rec sbatch "$@"; }
command_not_found_handle() { return 0; }
"""


@dataclass
class Snippet:
    """A piece of bash from a doc: a code block, an inline code span or a comment."""

    path: str  # relative to the repository root
    line: int  # 1-based line of the snippet's first line in the file
    text: str


@dataclass
class DocCommand:
    """One logical line of a snippet holding checked commands (kinds: train.py, evaluate.py,
    segany.<module>, sbatch -> how many times typed)."""

    path: str
    line: int
    last_line: int
    text: str
    code: str  # text without its bash comment
    kinds: Counter
    snippet: int  # index into the snippet list

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class Record:
    """A command as bash ran it."""

    line: int  # file line
    cwd: str
    sweep: str  # $SWEEP at the call (slurm/train.sbatch array sweeps)
    prog: str  # python | sbatch
    argv: list

    @property
    def kind(self) -> Optional[str]:
        a = self.argv
        if self.prog == "sbatch":
            return "sbatch"
        if a and a[0] in ("train.py", "evaluate.py"):
            return a[0]
        if len(a) > 1 and a[0] == "-m" and a[1].split(".")[0] == "segany":
            return a[1]
        return None


@dataclass
class Result:
    records: dict = field(default_factory=dict)  # snippet index -> [Record]
    stderr: dict = field(default_factory=dict)  # snippet index -> str


# ----------------------------------------------------------------------------- finding
def doc_files(root: Path) -> list:
    files = [root / "README.md", *sorted((root / "experiments").glob("*.md")), *sorted((root / "slurm").glob("*.md"))]
    files += [root / "slurm" / "train.sbatch", *sorted((root / "configs").rglob("*.yaml"))]
    return [f for f in files if f.exists()]


def _kind(m: re.Match) -> str:
    return m.group("script") or m.group("module") or "sbatch"


def _inline_spans(text: str, first_line: int):
    """(line, content) of the `code` spans of a markdown paragraph (spans may cross lines)."""
    for m in re.finditer(r"(`+)(.+?)\1", text, flags=re.S):
        yield first_line + text.count("\n", 0, m.start()), m.group(2).replace("\n", " ").strip()


def _command_span(s: str) -> Optional[str]:
    """The span as a command when it is one (env assignments before it allowed)."""
    m = re.match(r"(?:[A-Za-z_]\w*=\S*\s+)*", s)
    return s if COMMAND.match(s, m.end()) else None


def markdown_snippets(path: str, text: str) -> list:
    out, lines = [], text.split("\n")
    i, para, para_start = 0, [], 0

    def flush():
        if para:
            for ln, span in _inline_spans("\n".join(para), para_start):
                if _command_span(span):
                    out.append(Snippet(path, ln, span))
        para.clear()

    while i < len(lines):
        fence = re.match(r"\s*(```+|~~~+)\s*([\w+-]*)", lines[i])
        if fence:
            flush()
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith(fence.group(1)):
                j += 1
            if fence.group(2).lower() in SHELLS:
                out.append(Snippet(path, i + 2, "\n".join(lines[i + 1 : j])))
            i = j + 1
            continue
        if lines[i].strip():
            if not para:
                para_start = i + 1
            para.append(lines[i])
        else:
            flush()
        i += 1
    flush()
    return out


def comment_snippets(path: str, text: str) -> list:
    """Commands in `#` comments (yaml, the sbatch script): backtick spans, else the comment from
    the command on (a trailing `\\` joins the next comment line)."""
    out, lines = [], text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.search(r"(?:^|\s)#(?!SBATCH|!)(.*)$", line)
        if not m:
            i += 1
            continue
        comment, start = m.group(1), i + 1
        while comment.rstrip().endswith("\\") and i + 1 < len(lines) and lines[i + 1].lstrip().startswith("#"):
            i += 1
            comment = comment.rstrip() + "\n" + lines[i].lstrip()[1:]
        i += 1
        if "`" in comment:
            for _, span in _inline_spans(comment, start):
                if _command_span(span):
                    out.append(Snippet(path, start, span))
            continue
        c = COMMAND.search(comment)
        if c:
            head = re.search(r"(?:[A-Za-z_]\w*=\S*\s+)*$", comment[: c.start()])  # env assignments
            out.append(Snippet(path, start, comment[head.start() :].strip()))
    return out


def logical_lines(text: str):
    """(first line, last line, text) with backslash-newline continuations joined (0-based lines)."""
    lines, i = text.split("\n"), 0
    while i < len(lines):
        start, cur = i, lines[i]
        while cur.endswith("\\") and i + 1 < len(lines):
            i += 1
            cur = cur[:-1] + " " + lines[i]
        yield start, i, cur
        i += 1


def find(root: Path):
    """(snippets, commands) of every doc under root."""
    snippets = []
    for f in doc_files(root):
        rel, text = str(f.relative_to(root)), f.read_text()
        snippets += markdown_snippets(rel, text) if f.suffix == ".md" else comment_snippets(rel, text)
    commands = []
    for k, s in enumerate(snippets):
        for a, b, line in logical_lines(s.text):
            code = re.sub(r"(^|\s)#.*$", "", line)  # bash comments hold no commands
            kinds = Counter(_kind(m) for m in COMMAND.finditer(code))
            if kinds:
                commands.append(DocCommand(s.path, s.line + a, s.line + b, line.strip(), code.strip(), kinds, k))
    return snippets, commands


# ----------------------------------------------------------------------------- running bash
def run_snippets(snippets: list, workdir: Path, timeout: float = 30) -> Result:
    """Each snippet through bash in its own directory under workdir, python / sbatch recorded."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "empty-path").mkdir(exist_ok=True)
    pre = workdir / "preamble.sh"
    pre.write_text(_PREAMBLE)
    res = Result()
    for k, s in enumerate(snippets):
        d = workdir / f"s{k:03d}"
        d.mkdir(exist_ok=True)
        (d / "snippet.sh").write_text(s.text + "\n")
        out = d / "records"
        out.write_bytes(b"")
        env = {"PATH": str(workdir / "empty-path"), "HOME": str(d), "BASH_ENV": str(pre), "__DOCS_OUT": str(out)}
        p = subprocess.run(["/bin/bash", "snippet.sh"], cwd=d, env=env, capture_output=True, text=True, timeout=timeout)
        res.stderr[k] = p.stderr
        res.records[k] = [Record(s.line + r.line - 1, r.cwd, r.sweep, r.prog, r.argv) for r in _parse(out.read_bytes())]
    return res


def _parse(raw: bytes) -> list:
    f = raw.decode().split("\0")
    recs, i = [], 0
    while i < len(f) and f[i] == "@@REC":
        line, cwd, sweep, prog, n = f[i + 1 : i + 6]
        n = int(n)
        recs.append(Record(int(line), cwd, sweep, prog, f[i + 6 : i + 6 + n]))
        i += 6 + n
    return recs


# ----------------------------------------------------------------------------- Hydra
def hydra_entry(root: Path, script: str):
    """(config dir, config name) from the script's @hydra.main(...)."""
    src = (root / script).read_text()
    m = re.search(r"@hydra\.main\(([^)]*)\)", src)
    kw = dict(re.findall(r"(\w+)\s*=\s*[\"']([^\"']*)[\"']", m.group(1)))
    return root / kw["config_path"], kw["config_name"]


@contextlib.contextmanager
def environ(extra: Optional[dict]):
    old = dict(os.environ)
    os.environ.update(extra or {})
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(old)


def compose_jobs(root: Path, script: str, args: list, env: Optional[dict] = None, resolve: bool = True):
    """The job configs `python <script> <args>` composes, one per job of a -m sweep.
    Raises what Hydra raises for a bad override or a missing config."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf, open_dict

    from segany.utils.cli import renamed
    from segany.utils.config import register_resolvers

    register_resolvers()
    multirun = any(a in ("-m", "--multirun") for a in args)
    flags = [a for a in args if a.startswith("-") and a not in ("-m", "--multirun")]
    if flags:
        raise ValueError(f"{script}: flags {flags} are not handled by the docs check (only -m / --multirun)")
    overrides = [a for a in args if a not in ("-m", "--multirun")]
    old = renamed(overrides)  # what the script refuses before Hydra (segany.utils.cli.check_overrides)
    if old:
        raise ValueError(f"{script}: renamed config key(s):\n" + "\n".join(old))
    parsed = OverridesParser.create().parse_overrides(overrides)  # Hydra's own parse errors
    jobs = BasicSweeper.split_arguments(parsed, None)[0] if multirun else [overrides]
    config_dir, config_name = hydra_entry(Path(root).resolve(), script)
    GlobalHydra.instance().clear()
    out = []
    with environ(env), initialize_config_dir(config_dir=str(config_dir), version_base="1.3", job_name=script[:-3]):
        for job in jobs:
            cfg = compose(config_name, overrides=list(job), return_hydra_config=True)
            hydra_cfg = cfg.hydra
            with open_dict(cfg):
                del cfg["hydra"]
            if resolve:
                HydraConfig.instance().set_config(OmegaConf.create({"hydra": hydra_cfg}))
                try:
                    OmegaConf.to_container(cfg, resolve=True)
                finally:
                    HydraConfig.instance().cfg = None
            out.append((list(job), cfg, hydra_cfg))
    GlobalHydra.instance().clear()
    return out


def check_ranges(doc_text: str, args: list, cfg) -> list:
    """A {a..b} range typed in the command must reach the config unexpanded."""
    from omegaconf import OmegaConf

    errors = []
    for rng in set(RANGE.findall(doc_text)):
        keys = [a.split("=", 1)[0].lstrip("+~") for a in args if "=" in a and rng in a]
        if not keys:
            errors.append(f"{rng}: bash expanded the range before Hydra saw it; type it as 'key=\"...{rng}...\"'")
        for key in keys:
            value = OmegaConf.select(cfg, key, default=None)
            if rng not in str(value):
                errors.append(f"{key}: config value {value!r} lost the range {rng}")
    return errors


# ----------------------------------------------------------------------------- sbatch
def _sbatch_directives(script: Path) -> dict:
    opts = {}
    for line in script.read_text().splitlines():
        m = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
        if m:
            opts[m.group(1)] = m.group(2)
    return opts


def _array_ids(spec: Optional[str]):
    if not spec:
        return [None]
    ids = []
    for part in spec.split("%")[0].split(","):
        a, _, b = part.partition("-")
        ids += list(range(int(a), int(b or a) + 1))
    return ids


def sbatch_train_argvs(root: Path, rec: Record, workdir: Path) -> list:
    """[(train.py args, SLURM environment)] that slurm/train.sbatch would start for this sbatch
    call, one per array task. The script runs under bash with srun recorded instead of run."""
    argv = list(rec.argv)
    opts = {}
    while argv and argv[0].startswith("-"):
        a = argv.pop(0)
        if not a.startswith("--") or "=" not in a:
            raise ValueError(f"sbatch option {a!r}: the docs write options as --name=value")
        k, v = a[2:].split("=", 1)
        opts[k] = v
    if not argv or not argv[0].endswith("slurm/train.sbatch"):
        raise ValueError(f"sbatch: expected slurm/train.sbatch, got {argv[:1]}")
    script = root / "slurm" / "train.sbatch"
    o = {**_sbatch_directives(script), **opts}
    nodes, tasks = int(o.get("nodes", 1)), int(o.get("ntasks-per-node", 1))
    stub = workdir / "srun-stub"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "srun").write_text('#!/bin/sh\nprintf \'%s\\0\' "$@" > "$__SRUN_OUT"\n')
    (stub / "srun").chmod(0o755)
    out = []
    for task in _array_ids(o.get("array")):
        slurm = {
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NAME": o.get("job-name", "segany"),
            "SLURM_SUBMIT_DIR": rec.cwd,
            "SLURM_NNODES": str(nodes),
            "SLURM_JOB_NUM_NODES": str(nodes),
            "SLURM_NTASKS": str(nodes * tasks),
            "SLURM_NTASKS_PER_NODE": str(tasks),
            "SLURM_TASKS_PER_NODE": f"{tasks}(x{nodes})" if nodes > 1 else str(tasks),
            "SLURM_GPUS_PER_NODE": str(o.get("gpus-per-node", 0)),
            "SLURM_CPUS_PER_TASK": str(o.get("cpus-per-task", 1)),
            "SLURM_RESTART_COUNT": "0",
        }
        if task is not None:
            slurm["SLURM_ARRAY_TASK_ID"] = str(task)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SEGANY_HOME", "SWEEP"))}
        env.update(slurm, PATH=f"{stub}:{env.get('PATH', '')}", __SRUN_OUT=str(stub / "argv"))
        if rec.sweep:
            env["SWEEP"] = rec.sweep
        (stub / "argv").write_bytes(b"")
        p = subprocess.run(
            ["/bin/bash", str(script), *argv[1:]], cwd=rec.cwd, env=env, capture_output=True, text=True, timeout=30
        )
        if p.returncode:
            raise RuntimeError(f"slurm/train.sbatch exited {p.returncode}: {p.stderr.strip()[-800:]}")
        srun = (stub / "argv").read_bytes().decode().split("\0")[:-1]
        while srun and srun[0].startswith("-"):
            srun.pop(0)
        if srun[:2] not in (["python", "train.py"], ["python3", "train.py"]):
            raise RuntimeError(f"slurm/train.sbatch: srun did not start python train.py: {srun[:4]}")
        out.append((srun[2:], slurm))
    return out


# ----------------------------------------------------------------------------- argparse CLIs
class _Parsed(Exception):
    pass


def check_argparse(module: str, args: list) -> Optional[str]:
    """Run `python -m module args` until argparse has parsed args; None when they parse, else
    argparse's message. Fails when the module never calls parse_args. A bare mention (no
    arguments, e.g. in prose) is checked as `--help`."""
    args = list(args) or ["--help"]
    orig = argparse.ArgumentParser.parse_args

    def parse_args(self, a=None, namespace=None):
        raise _Parsed(orig(self, a, namespace))

    err, argv = io.StringIO(), sys.argv
    argparse.ArgumentParser.parse_args = parse_args
    sys.argv = [module, *args]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module was imported before (by a test)
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except _Parsed:
        return None
    except SystemExit as e:
        return None if e.code in (0, None) else f"exit {e.code}: {err.getvalue().strip()[-600:]}"
    finally:
        argparse.ArgumentParser.parse_args = orig
        sys.argv = argv
    return f"python -m {module} returned without parsing its arguments with argparse"
