"""The repository text speaks of the project alone: no run diary in the docs, code or configs.

Scanned: README.md, train.py, evaluate.py and the text files under experiments/, docs/, configs/,
benchmarks/, segany/ and slurm/. Refused, each by a narrow pattern so that ordinary words pass:
work sessions ("session 7", "this session", "between sessions"), issues by number ("issue 18",
"issue-15 defaults"), helpers and agents that worked on the project ("helpers loaded the
machine"; the code's "generic helpers" passes), and how loaded the machine was ("load average
11", "load 5-7", "a slower machine day", "the machine was busy", "4 jobs on the 2 cores", "solo").

In segany/annotate/ a "session" is the annotation tool's own (the user annotating in the
browser: session.py, "undo this session's last change"), so there only the numbered forms count.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = ("README.md", "train.py", "evaluate.py")
DIRS = ("experiments", "docs", "configs", "benchmarks", "segany", "slurm")
TEXT = {".md", ".py", ".yaml", ".yml", ".txt", ".sbatch", ".sh", ".json", ".toml", ".cfg", ".html", ".js", ".css"}
ANNOTATE = "segany/annotate/"  # "session" there is the annotation tool's user session

_SESSION_NUMBERED = r"\bsessions?[- ]\d+|\bsession-\d+"
_SESSION_PHRASE = (
    r"\b(?:this|last|previous|next|earlier|later|one|that|each|every|another|same|a) session\b"
    r"|\bbetween sessions\b|\bsession (?:script|run|log|diary)s?\b"
)
PATTERNS = {
    "session": re.compile(_SESSION_NUMBERED, re.I),
    "session (process)": re.compile(_SESSION_PHRASE, re.I),
    "issue number": re.compile(r"\bissues?[- ]#?\d+|\bissue #\d+", re.I),
    "agent": re.compile(r"(?<!user-)(?<!user )\bagents?\b", re.I),
    "helper (process)": re.compile(
        r"\bhelpers? (?:loaded|ran|running|were running|was running|shared (?:the|this) (?:machine|cpu))\b"
        r"|\b(?:parallel|concurrent) helpers\b",
        re.I,
    ),
    "machine load": re.compile(
        r"\bload average\b|\(load \d|\bat load \d|\bunder (?:heav\w+ )?load\b|\bheav\w* load(?:ed)?\b"
        r"|\bmachine day\b|\b(?:slower|faster|slow|busy|quiet) day\b"
        r"|\b(?:busy|loaded|quiet|idle) (?:\d+-core )?(?:machine|cpu|core)s?\b"
        r"|\b(?:machine|cpu|cores?) (?:was|were|is) (?:busy|loaded|quiet|idle)\b"
        r"|\bjobs? on the \d+ cores\b|\bother jobs\b|\bthe shared (?:\d+-core )?(?:machine|cpu)\b|\bsolo\b",
        re.I,
    ),
}


def text_files(root: Path) -> list:
    files = [root / f for f in FILES if (root / f).is_file()]
    for d in DIRS:
        files += sorted(p for p in (root / d).rglob("*") if p.is_file() and p.suffix in TEXT)
    return files


def scan(root: Path) -> list:
    """'path:line: [kind] matched text' for every process word under root."""
    found = []
    for path in text_files(root):
        rel = path.relative_to(root).as_posix()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            continue
        for n, line in enumerate(lines, 1):
            for kind, pat in PATTERNS.items():
                if kind == "session (process)" and rel.startswith(ANNOTATE):
                    continue
                for m in pat.finditer(line):
                    found.append(f"{rel}:{n}: [{kind}] {m.group(0)!r} in: {line.strip()[:160]}")
    return found


def test_the_repository_has_no_process_words():
    found = scan(ROOT)
    assert not found, "process words (write dated, factual wording instead):\n" + "\n".join(found)


def test_the_scanner_reports_planted_words_by_file_and_line(tmp_path):
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "run.md").write_text(
        "# run\n\nmeasured in session 9, on a slower machine day\nthe 2-core CPU at load average 11\n"
        "see issue 18; Helpers loaded this machine\n"
    )
    found = scan(tmp_path)
    assert any(f.startswith("experiments/run.md:3: [session]") and "session 9" in f for f in found), found
    assert any(f.startswith("experiments/run.md:3: [machine load]") and "machine day" in f for f in found), found
    assert any(f.startswith("experiments/run.md:4: [machine load]") and "load average" in f for f in found), found
    assert any(f.startswith("experiments/run.md:5: [issue number]") for f in found), found
    assert any(f.startswith("experiments/run.md:5: [helper (process)]") for f in found), found
    assert len(found) == 5, found


def test_the_scanner_passes_clean_text_and_the_annotation_session(tmp_path):
    (tmp_path / "segany" / "annotate").mkdir(parents=True)
    (tmp_path / "segany" / "utils").mkdir()
    (tmp_path / "README.md").write_text(
        "Measured 2026-12-07 on a 2-core AMD EPYC CPU: `python train.py`, 675 steps.\n"
        "Generic helpers (io, dist); the model is loaded once; the issue tracker; a user agent string.\n"
    )
    (tmp_path / "segany" / "utils" / "x.py").write_text('"""Helpers for tests: a loaded checkpoint."""\n')
    (tmp_path / "segany" / "annotate" / "server.py").write_text(
        '"""POST /undo: undo this session\'s last change (the annotation session)."""\n'
    )
    assert scan(tmp_path) == []
    # outside segany/annotate the same phrase is a work session
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("undo this session's last change\n")
    assert [f.split(" ")[0] for f in scan(tmp_path)] == ["docs/a.md:1:"]
    # the numbered form counts even in segany/annotate
    (tmp_path / "segany" / "annotate" / "store.py").write_text("# written in session 4\n")
    assert "segany/annotate/store.py:1:" in [f.split(" ")[0] for f in scan(tmp_path)]
