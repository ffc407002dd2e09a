"""The package's shape: one folder per layer, no import circle between modules or between folders,
nothing imports a layer above its own, and no function longer than a screen (function-local imports
count as imports)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qlora_lite"
# The layers, lowest first: a module may import its own layer and the ones before it. A folder is
# one layer; a module at the top of the package is a layer of its own.
LAYERS = ["_moved", "errors", "utils", "recipe", "data", "ops", "model", "lora", "parallel", "runs", "generate", "train",
          "memory", "export", "cli", "__main__", "__init__"]
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    """`lora.layer` for qlora_lite/lora/layer.py, `lora` for its __init__.py, `recipe` for recipe.py."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def package_imports(path: Path, known: set[str], top_level_only: bool) -> set[str]:
    """The qlora_lite modules `path` imports (relative or absolute), as module names."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" and len(here) > 0 and path.parent != PACKAGE else here[:-1]
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.startswith("qlora_lite."):
                base = node.module.split(".")[1:]
            else:
                continue
            target = ".".join(base)
            for alias in node.names:  # `from . import tiny` names a module; `from .x import f` names x
                sub = f"{target}.{alias.name}" if target else alias.name
                out.add(sub if sub in known else target)
        elif isinstance(node, ast.Import):
            out.update(a.name.removeprefix("qlora_lite.") for a in node.names if a.name.startswith("qlora_lite."))
    return {m for m in out if m in known} - {module_name(path)}


def import_graph(top_level_only: bool) -> dict[str, set[str]]:
    found = modules()
    return {name: package_imports(p, set(found), top_level_only) for name, p in found.items()}


def layer(module: str) -> str:
    return module.split(".")[0]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
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


def test_relative_imports_resolve_to_the_modules_they_name():
    graph = import_graph(top_level_only=False)
    assert "model.quant" in graph["lora.layer"] and "recipe" in graph["lora.layer"]
    assert "model.tiny" in graph["model.loader"]  # from . import tiny
    assert {"data.demo_rows", "data.templates"} <= graph["model.loader"]  # from ..data import demo_rows, templates


@pytest.mark.parametrize("top_level_only", [True, False])
def test_no_import_circle_between_modules_or_between_layers(top_level_only):
    graph = import_graph(top_level_only)
    assert {"export.merge", "export.verify", "generate", "runs.folder", "train.loop"} <= set(graph)
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"
    layers: dict[str, set[str]] = {}
    for m, deps in graph.items():
        layers.setdefault(layer(m), set()).update(layer(d) for d in deps if layer(d) != layer(m))
    assert find_cycle(layers) is None, f"circle between layers: {' -> '.join(find_cycle(layers))}"


def test_every_layer_is_listed_and_nothing_imports_upward():
    graph = import_graph(top_level_only=False)
    assert {layer(m) for m in graph} == set(LAYERS), "add a new folder or top-level module to LAYERS"
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps if rank[layer(d)] > rank[layer(m)])
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "split these:\n" + "\n".join(long)


@pytest.mark.slow
@pytest.mark.parametrize("module", ["export.verify", "generate", "export.merge", "runs.folder", "memory.estimate",
                                    "train.loop", "cli"])
def test_each_module_imports_on_its_own(module):
    """A fresh interpreter: the modules of the old export/verify/generate circle import first."""
    subprocess.run([sys.executable, "-c", f"import qlora_lite.{module}"], check=True,
                   cwd=PACKAGE.parent, capture_output=True)


def test_old_module_paths_still_work_or_name_their_new_place():
    """0.1's flat modules: a moved one fails with its new path; one that became a folder still
    hands out its names."""
    from qlora_lite._moved import MOVED

    for old, new in MOVED.items():
        with pytest.raises(ImportError, match=f"{old} moved to {new}"):
            __import__(old)
    with pytest.raises(ImportError, match="qlora_lite.step moved to qlora_lite.train.step"):
        from qlora_lite import step  # noqa: F401
    from qlora_lite.export import export_model
    from qlora_lite.lora import LoRALinear, attach_lora
    from qlora_lite.train import prepare_run_dir, setup_run, train
    from qlora_lite.train.loop import train as loop_train

    assert train is loop_train and setup_run.__module__ == "qlora_lite.train.setup"
    assert prepare_run_dir.__module__ == "qlora_lite.runs.folder" and attach_lora.__module__ == "qlora_lite.lora.layer"
    assert LoRALinear and export_model.__module__ == "qlora_lite.export.merge"
    import qlora_lite.train

    assert not hasattr(qlora_lite.train, "no_such_name")


@pytest.mark.slow
def test_the_wheel_ships_every_subpackage_and_the_model_configs(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(PACKAGE.parent)], check=True, capture_output=True)
    import zipfile

    names = zipfile.ZipFile(next(tmp_path.glob("qlora_lite-*.whl"))).namelist()
    folders = {p.parent.relative_to(PACKAGE.parent).as_posix() for p in PACKAGE.rglob("*.py")}
    assert folders <= {n.rsplit("/", 1)[0] for n in names}
    shipped = {n.rsplit("/", 1)[1] for n in names if n.startswith("qlora_lite/memory/configs/")}
    assert shipped == {p.name for p in (PACKAGE / "memory" / "configs").glob("*.json")} and "llama-2-7b.json" in shipped


def test_every_folder_of_the_package_is_a_regular_package():
    """An __init__.py in each: a folder a .gitignore hides from git still imports as a namespace
    package here, and goes missing from a clone."""
    folders = {p.parent for p in PACKAGE.rglob("*.py")}
    assert all((f / "__init__.py").is_file() for f in folders), sorted(str(f) for f in folders)
