"""The package layout holds: imports run one way, without circles, at most six modules deep.

docs/architecture.md draws the plan: tools -> program -> engine -> optim / models / data ->
penalty, with the entry points (``gdreg.main``, the console scripts) on top. Every import
statement of every module of ``gdreg/`` is read from its source, at module level and inside
functions alike (only ``if TYPE_CHECKING:`` blocks, which never run, are left out), together
with ``importlib.import_module("gdreg....")`` calls on a literal name.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gdreg"

#: The floors of the plan: a module may import from its own package and from lower floors.
FLOORS = {
    "penalty": 0,
    "optim": 1,
    "models": 1,
    "data": 1,
    "engine": 2,
    "program": 3,
    "tools": 4,
}
#: The top floor: the public API's lazy front and the command-line entry points.
ENTRY_FLOOR = 5
MAX_DEPTH = 6
#: What the public penalty may import besides the standard library and itself.
PENALTY_THIRD_PARTY = {"jax", "flax", "optax", "numpy"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@functools.cache
def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in FLOORS else ""


def floor(module: str) -> int:
    return FLOORS.get(package_of(module), ENTRY_FLOOR)


def _resolve(name: str) -> str | None:
    """The gdreg module that ``import name`` runs last (a submodule, or its package)."""
    known = modules()
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _statements(tree: ast.AST):
    """Every node that runs, leaving out the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def imported_names(module: str) -> list[tuple[str, int]]:
    """``(full dotted name, line)`` of everything ``module`` imports (any package)."""
    path = modules()[module]
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    names = []
    for node in _statements(tree):
        if isinstance(node, ast.Import):
            names += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                # a submodule (``from gdreg.program import loop``), else a name of ``base``
                full = f"{base}.{alias.name}"
                names.append((full if full in modules() else base, node.lineno))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.append((node.args[0].value, node.lineno))
    return names


@functools.cache
def edges() -> dict[str, dict[str, int]]:
    """``{module: {imported gdreg module: line}}``."""
    graph: dict[str, dict[str, int]] = {}
    for module in modules():
        targets: dict[str, int] = {}
        for name, line in imported_names(module):
            if name.split(".")[0] != "gdreg":
                continue
            target = _resolve(name)
            if target and target != module:
                targets.setdefault(target, line)
        graph[module] = targets
    return graph


def longest_chain(graph: dict[str, dict[str, int]]) -> list[str]:
    """The longest path of imports (the graph must have no circles)."""
    assert not cycles(graph), "a circle has no longest chain"

    @functools.cache
    def chain(module: str) -> tuple[str, ...]:
        below = [chain(target) for target in graph[module]]
        return (module, *max(below, key=len, default=()))

    return list(max((chain(module) for module in graph), key=len))


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in graph[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    return found


def test_the_graph_is_read_from_every_module():
    graph = edges()
    assert {"gdreg.main", "gdreg.penalty.transform", "gdreg.program.loop"} <= graph.keys()
    # a function-level import (gdreg.main imports the loop inside a function) is an edge
    assert "gdreg.program.loop" in graph["gdreg.main"]


def test_imports_run_one_way():
    wrong = [
        f"{module}:{line} imports {target} (floor {floor(target)} of {package_of(target)!r}, "
        f"from floor {floor(module)})"
        for module, targets in edges().items()
        for target, line in targets.items()
        if floor(target) > floor(module)
        or (floor(target) == floor(module) and package_of(target) != package_of(module))
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_circles():
    assert not cycles(edges())


def test_the_longest_import_chain_is_at_most_six_modules():
    chain = longest_chain(edges())
    assert len(chain) <= MAX_DEPTH, " -> ".join(chain)


def test_the_penalty_needs_only_jax_flax_optax_numpy():
    import sys

    standard = set(sys.stdlib_module_names) | {"__future__"}
    for module in modules():
        if package_of(module) != "penalty":
            continue
        outside = {
            name.split(".")[0]
            for name, _ in imported_names(module)
            if name.split(".")[0] not in standard | PENALTY_THIRD_PARTY | {"gdreg"}
        }
        assert not outside, (module, outside)
        assert all(package_of(t) == "penalty" for t in edges()[module]), module


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from gdreg.program import loop\n", {"gdreg.program.loop"}),
        ("def f():\n    from gdreg.tools.report import run\n", {"gdreg.tools.report"}),
        ("import importlib\nimportlib.import_module('gdreg.engine.mesh')\n", {"gdreg.engine.mesh"}),
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from gdreg.tools import bench\n",
            set(),
        ),
    ],
)
def test_the_reader_sees_every_kind_of_import(tmp_path, monkeypatch, source, expected):
    # The checker itself can fail: it finds module-level, function-level and literal
    # importlib imports, and skips only what never runs.
    fake = PACKAGE / "engine" / "evaluate.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: source)
    found = {_resolve(name) for name, _ in imported_names(module_name(fake))}
    found.discard(None)
    assert {name for name in found if name.startswith("gdreg.")} - {"gdreg"} == expected
