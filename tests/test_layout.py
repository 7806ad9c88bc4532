"""The package's shape: no import cycle, modules of a readable size, and the subpackages a scorer or a
dataset tool needs importable without torch (so `rcnn evaluate --data` and `rcnn data stats` start fast)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import rcnn
import rcnn.stages
from rcnn.store.code_identity import direct_imports

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 420  # "about 400": one idea per module


def first_party_modules() -> list[str]:
    names = ["rcnn", "rcnn.stages"]
    for pkg in (rcnn, rcnn.stages):
        names += [info.name for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
    return sorted(set(names))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_our_modules():
    # Imports inside functions count too: a lazy import only hides a cycle.
    graph = {m: set(direct_imports(m)) for m in first_party_modules()}
    assert cycles(graph) == []


def test_no_module_over_about_400_lines():
    files = [p for p in (REPO / "rcnn").rglob("*.py") if not p.is_symlink()]
    files += list((REPO / "stages").glob("*.py")) + [REPO / "cli.py"]
    long = {str(p.relative_to(REPO)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


@pytest.mark.parametrize("package", ["rcnn.data", "rcnn.evaluation", "rcnn.store", "rcnn.config", "rcnn.structures"])
def test_subpackage_imports_without_torch(package):
    modules = [info.name for info in pkgutil.walk_packages(__import__(package, fromlist=["_"]).__path__, package + ".")]
    heavy = "sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision'))"
    code = f"import sys\nfor m in {[package, *modules]!r}:\n    __import__(m)\nprint({heavy})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_scoring_and_dataset_commands_never_import_torch(tiny_voc, tmp_path):
    code = f"""
import sys
from rcnn.cli import main
for argv in (["data", "stats", {str(tiny_voc)!r}], ["evaluate", "--data", {str(tiny_voc)!r}, "--split", "test",
             "--detections", {str(tmp_path)!r}, "--classes", "circle"]):
    try:
        main(argv)
    except SystemExit as e:
        assert not e.code, (argv, e.code)
print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
