"""The package's shape: every module imports, no import cycle between modules (at module level)
or between packages (any import, deferred ones included), and `dwnet.checkpoint` never imports
`dwnet.engine`."""
import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dwnet"


def module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__main__":
            continue  # runs its command when imported
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


def source_of(module: str) -> Path:
    path = ROOT / Path(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imported(module: str, module_level_only: bool) -> set[str]:
    """The dwnet modules `module` imports (`from pkg import name` counts as pkg.name when that is a
    module, else as pkg)."""
    path = source_of(module)
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    if module_level_only:  # what runs at import: `if`/`try` blocks too, not function or class bodies
        deferred = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
        nodes = [n for top in tree.body if not isinstance(top, deferred) for n in ast.walk(top)]
    else:
        nodes = list(ast.walk(tree))
    known = set(module_names()) | {"dwnet"}
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {name for name in found if name in known and name != module}


def unit(module: str) -> str:
    """The package a module belongs to: `dwnet.engine`, `dwnet.checkpoint`, ...; a module directly
    under dwnet/ is a unit of its own."""
    parts = module.split(".")
    return ".".join(parts[:2])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.mark.parametrize("module", module_names())
def test_every_module_imports(module):
    importlib.import_module(module)


def test_no_import_cycle_between_modules():
    # The package itself (dwnet/__init__.py registers the models) is where every import starts.
    graph = {m: {d for d in imported(m, module_level_only=True) if d != "dwnet"} for m in module_names()}
    assert cycles(graph) == []


def test_no_import_cycle_between_packages():
    graph: dict[str, set[str]] = {}
    for module in module_names():
        if module == "dwnet":
            continue
        targets = {unit(d) for d in imported(module, module_level_only=False) if d != "dwnet"}
        graph.setdefault(unit(module), set()).update(targets - {unit(module)})
    assert cycles(graph) == []
    assert "dwnet.engine" not in graph["dwnet.checkpoint"]


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
