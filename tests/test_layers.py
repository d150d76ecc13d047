"""The package's shape (docs/architecture.md): layers import only downwards, no module imports
itself back through others, and `import segany` stays light (no training or evaluation)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def test_layer_contract_holds():
    """import-linter's layers contract in pyproject.toml (utils <- modeling <- data <- inference
    <- evaluation <- training <- engine / export / callbacks / testing)."""
    out = subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "1 kept, 0 broken" in out.stdout


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), i.e. import cycles."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for m in sorted(graph.modules):
        if m not in index:
            visit(m)
    return out


def test_no_import_cycles():
    sys.setrecursionlimit(10000)
    graph = grimp.build_graph("segany")
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    """The check above can fail: a two-module cycle added to a real graph is found."""
    graph = grimp.build_graph("segany")
    assert "segany.modeling.transforms" in graph.find_modules_directly_imported_by("segany.inference.predictor")
    graph.add_import(importer="segany.modeling.transforms", imported="segany.inference.predictor")
    assert ["segany.inference.predictor", "segany.modeling.transforms"] in _cycles(graph)


def test_import_segany_pulls_in_no_training_or_evaluation():
    code = (
        "import sys, segany; bad = sorted(m for m in sys.modules if m.startswith(('segany.training', "
        "'segany.evaluation', 'segany.engine', 'segany.data', 'pytorch_lightning', 'hydra'))); print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
