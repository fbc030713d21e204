"""The package has no import circle: every module's imports of other anneal_geo modules, at
module level, inside functions, for type checking and by name (``importlib.import_module``
with a literal name), form a graph without cycles.

The one exception: a package ``__init__`` that re-exports names lazily (through a module
``__getattr__``) imports them under ``if TYPE_CHECKING:`` only for type checkers; those
imports are not counted, since at run time the facade imports nothing."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "anneal_geo"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def resolve(module: str | None, level: int) -> str:
        if level == 0:
            return module or ""
        base = name.split(".")
        base = base if is_package else base[:-1]
        base = base[: len(base) - (level - 1)]
        return ".".join([*base, module] if module else base)

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if is_package and isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if (
                isinstance(child, ast.Call)
                and isinstance(child.func, ast.Attribute)
                and child.func.attr == "import_module"
                and child.args
                and isinstance(child.args[0], ast.Constant)
                and child.args[0].value in known
            ):
                found.add(str(child.args[0].value))  # importlib.import_module("anneal_geo.x")
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name in known)
            elif isinstance(child, ast.ImportFrom):
                target = resolve(child.module, child.level)
                for alias in child.names:
                    sub = f"{target}.{alias.name}"
                    if sub in known:
                        found.add(sub)
                    elif target in known:
                        found.add(target)
            visit(child)

    visit(tree)
    found.discard(name)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_the_checker_finds_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_the_checker_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    source = (
        "import importlib\ndef f():\n    from anneal_geo.data import pool\n"
        "def g():\n    return importlib.import_module('anneal_geo.data.tiles')\n"
    )
    path = PACKAGE / "data" / "cube.py"
    probe = tmp_path / "probe.py"
    probe.write_text(source)
    known = set(_modules())
    assert _imports(probe, "anneal_geo.data.cube", known) == {
        "anneal_geo.data.pool",
        "anneal_geo.data.tiles",
    }
    assert path.exists()


def test_no_import_circle_inside_the_package() -> None:
    modules = _modules()
    known = set(modules)
    graph = {name: _imports(path, name, known) for name, path in modules.items()}
    assert _cycles(graph) == []


def test_cli_command_modules_never_import_the_cli_package_root() -> None:
    modules = _modules()
    known = set(modules)
    for name, path in modules.items():
        if name.startswith("anneal_geo.cli.") and name != "anneal_geo.cli.root":
            imported = _imports(path, name, known)
            assert "anneal_geo.cli" not in imported, name
            assert "anneal_geo.cli.root" not in imported, name
