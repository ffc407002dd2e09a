"""The package's modules import each other without a circle, even counting function-local imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qlora_lite"


def package_imports(path: Path, top_level_only: bool) -> set[str]:
    """Names of qlora_lite modules that `path` imports (relative or absolute)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                out.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import tiny
                out.update(a.name for a in node.names)
            elif node.module and node.module.startswith("qlora_lite."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("qlora_lite."))
    return out - {path.stem}


def import_graph(top_level_only: bool) -> dict[str, set[str]]:
    modules = {p.stem: p for p in PACKAGE.glob("*.py")}
    return {name: package_imports(p, top_level_only) & set(modules) for name, p in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_find_cycle_finds_a_circle_and_accepts_a_tree():
    assert find_cycle({"export": {"verify"}, "verify": {"generate"}, "generate": {"export"}}) == \
        ["export", "verify", "generate", "export"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize("top_level_only", [True, False])
def test_package_has_no_import_circle(top_level_only):
    graph = import_graph(top_level_only)
    assert {"export", "verify", "generate", "runfolder"} <= set(graph)
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


@pytest.mark.slow
@pytest.mark.parametrize("module", ["verify", "generate", "export", "runfolder", "estimate"])
def test_each_module_imports_on_its_own(module):
    """A fresh interpreter: the modules of the old export/verify/generate circle import first."""
    subprocess.run([sys.executable, "-c", f"import qlora_lite.{module}"], check=True,
                   cwd=PACKAGE.parent, capture_output=True)
