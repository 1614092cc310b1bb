"""The house rules of vqa/: no import circle (lazy imports included), no module over 450 lines,
every subpackage says what it owns, and the official metric and the records need no torch."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures import ROOT

PACKAGE = ROOT / "vqa"
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, name: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of `known` that module `name` imports anywhere in its source (inside functions
    too), each package on the way included: importing vqa.a.b runs vqa.a's __init__ first."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from pkg import name` imports pkg.name when that is a module
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            parts = target.split(".")
            found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    # A module's own packages are being imported already when it runs: not an edge.
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    return {m for m in found if m in known and m != name and m not in ancestors}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imported_modules(path.read_text(), name, path.name == "__init__.py", set(paths))
            for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_walker_finds_lazy_and_relative_imports_and_cycles():
    source = "import json\n\ndef f():\n    from .records import VQASplit\n    from ..errors import DataError\n"
    known = {"vqa.worlds.records", "vqa.errors", "vqa.worlds", "vqa.batching"}
    # its own package, vqa.worlds, is no edge: it is being imported when the module runs
    assert imported_modules(source, "vqa.worlds.probe", False, known) == {"vqa.worlds.records", "vqa.errors"}
    assert imported_modules("from . import batching", "vqa", True, {"vqa.batching"}) == {"vqa.batching"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_in_vqa():
    graph = import_graph()
    assert {"vqa.records", "vqa.worlds.registry", "vqa.worlds.shapes.files"} <= set(graph)
    assert "vqa.records" in graph["vqa.worlds.registry"]  # the registry reads the files the world writes
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


@pytest.mark.parametrize("path", sorted([*PACKAGE.rglob("*.py"), ROOT / "app.py", *(ROOT / "training").glob("*.py")]),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_is_over_450_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines: split it by what it does"


# Every folder of modules: one without __init__.py is a namespace package, which
# setuptools' find (pyproject.toml) leaves out of a non-editable install.
@pytest.mark.parametrize("package", sorted({p.parent for p in PACKAGE.rglob("*.py")} - {PACKAGE}),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_each_subpackage_says_what_it_owns(package):
    assert (package / "__init__.py").is_file(), f"{package.relative_to(ROOT)} has no __init__.py"
    docstring = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
    assert len(docstring.split()) >= 25, f"{package.relative_to(ROOT)}/__init__.py needs a paragraph on what it owns"


def test_the_metric_and_the_records_need_no_torch():
    code = "import sys, vqa.metrics, vqa.records, vqa.report; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"
