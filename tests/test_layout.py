"""The package's shape: no import circles (counting imports inside functions too), a short top level,
and every model option defined in one place."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lorat"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The lorat modules ``path`` imports anywhere in its body (top level, functions, TYPE_CHECKING)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
            found |= {n for n in names if n in modules} | ({node.module} if node.module in modules else set())
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
    return found


def _graph() -> dict[str, set[str]]:
    files = [p for p in PACKAGE.rglob("*.py")]
    modules = {_module_name(p) for p in files}
    graph = {_module_name(p): _imports(p, modules) for p in files}
    for name in graph:  # a package's __init__ imports nothing of its own (docstrings only)
        graph[name].discard(name)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circles():
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_short_top_level():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 16, top


def test_model_options_are_defined_once():
    """``--weights`` and its siblings are defined in lorat/options.py's table and added to parsers by
    ``add_model_arguments`` only: no command, the app or a bench script defines one itself."""
    from lorat.options import _OPTIONS

    flags = ("weights", "config", "backbone-weights", "phase1-weights", "device", "dtype", "threads", "backend")
    assert sorted(flag for flag, _ in _OPTIONS.values()) == sorted(f"--{f}" for f in flags)
    definition = re.compile(r"add_argument\(\s*[\"']--(" + "|".join(flags) + r")[\"']")
    places = sorted({str(p.relative_to(ROOT)) for folder in ("lorat", "apps", "bench")
                     for p in (ROOT / folder).rglob("*.py") if definition.search(p.read_text())})
    assert places == []


def test_no_references_to_documents_outside_the_repository():
    names = ("LORAT" + "_SPEC", "FIELD" + "_NOTES")
    suffixes = {".py", ".md", ".sh", ".toml", ".yaml", ".ini", ".cff", ".yml"}
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    offenders = [f for f in tracked if Path(f).suffix in suffixes and (ROOT / f).is_file()
                 and any(n in (ROOT / f).read_text() for n in names)]
    assert offenders == []
