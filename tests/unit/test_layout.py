"""The layers of dicomflow/, checked on its import graph (read with ast; nothing is imported).

A module imports only modules of its own layer or below (LAYERS, bottom to top: the table in
docs/architecture.md); nothing outside the operator tools imports them; no two modules import each
other, directly or around a loop. Imports made only for the type checker (``if TYPE_CHECKING:``)
count too: a reader follows them the same way.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from tests.unit.test_architecture_doc import layers as architecture_layers

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "dicomflow"

BASE = 1
FUNCTIONS = 5
OPERATOR = 6
# Module (its name inside dicomflow) -> layer, from the layer table of docs/architecture.md
# (one table for the reader and the check). The operator tools (dicomflow/ops/ and the CLI
# entry __main__.py) are layer OPERATOR.
LAYERS: dict[str, int] = {"__init__": BASE} | {
    name: number
    for name, number in architecture_layers().items()
    if not (name.startswith("ops.") or name == "__main__")
}

Graph = dict[str, set[str]]


# --- reading imports (tests/unit/test_archive.py uses these too) -----------------------------


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_nodes(tree: ast.AST, *, runtime_only: bool = False) -> Iterator[ast.AST]:
    """Every import statement of a module, at any depth (a function's lazy import included), and
    every ``importlib.import_module("literal")`` call. With `runtime_only`, not those under
    ``if TYPE_CHECKING:``."""
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import | ast.ImportFrom) or _import_module_call(node):
            yield node
        if runtime_only and isinstance(node, ast.If) and _type_checking_only(node):
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))


def _import_module_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call) or not node.args:
        return False
    func, arg = node.func, node.args[0]
    named = (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id == "import_module"
    )
    return named and isinstance(arg, ast.Constant) and isinstance(arg.value, str)


def imported_names(node: ast.AST, package: str) -> list[str]:
    """The dotted names one import node brings in, seen from a module of `package`. For
    ``from a.b import c``: ``a.b.c``, which is a module or a name defined in ``a.b``."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            parts = package.split(".")
            base = ".".join([*parts[: len(parts) - node.level + 1], *([base] if base else [])])
        return [base if alias.name == "*" else f"{base}.{alias.name}" for alias in node.names]
    assert isinstance(node, ast.Call) and isinstance(node.args[0], ast.Constant)
    return [str(node.args[0].value)]


def module_name(path: Path, root: Path) -> tuple[str, str]:
    """(module, its package): dicomflow/ops/cli.py -> (dicomflow.ops.cli, dicomflow.ops);
    dicomflow/__init__.py -> (dicomflow, dicomflow)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
        return ".".join(parts), ".".join(parts)
    return ".".join(parts), ".".join(parts[:-1])


# --- the graph and its checks ----------------------------------------------------------------


def short(name: str, package: str) -> str:
    """dicomflow.ops.cli -> ops.cli; dicomflow -> __init__."""
    return name[len(package) + 1 :] if name != package else "__init__"


def graph(package_dir: Path) -> Graph:
    """{module: dicomflow modules it imports}, both by their names inside the package. A name is
    taken to its longest prefix that is a module: dicomflow.clock.utcnow -> clock."""
    package = package_dir.name
    modules = {
        module_name(p, package_dir.parent): p
        for p in package_dir.rglob("*.py")
        if "__pycache__" not in p.parts
    }
    names = {name for name, _ in modules}
    found: Graph = {}
    for (name, parent), path in modules.items():
        deps = set()
        for node in import_nodes(ast.parse(path.read_text(), str(path))):
            for imported in imported_names(node, parent):
                parts = imported.split(".")
                prefixes = (".".join(parts[:n]) for n in range(len(parts), 0, -1))
                target = next((p for p in prefixes if p in names), None)
                if target is not None and target != name:
                    deps.add(short(target, package))
        found[short(name, package)] = deps
    return found


def is_operator(module: str) -> bool:
    return module == "ops" or module.startswith("ops.") or module == "__main__"


def layer(module: str, layers: dict[str, int]) -> int | None:
    return OPERATOR if is_operator(module) else layers.get(module)


def check_placed(g: Graph, layers: dict[str, int]) -> list[str]:
    """Every module has a layer, and every layer entry names a module."""
    problems = [
        f"{m} has no layer: add it to LAYERS" for m in sorted(g) if layer(m, layers) is None
    ]
    problems += [f"LAYERS names {m}, which does not exist" for m in sorted(set(layers) - set(g))]
    return problems


def check_operator_tools_private(g: Graph) -> list[str]:
    return [
        f"{m} imports the operator tool {d}"
        for m in sorted(g)
        if not is_operator(m)
        for d in sorted(g[m])
        if is_operator(d)
    ]


def check_layers(g: Graph, layers: dict[str, int], only: set[str] | None = None) -> list[str]:
    """Imports that go up a layer, of `only` these modules when given."""
    problems = []
    for m in sorted(only if only is not None else g):
        mine = layer(m, layers)
        for d in sorted(g[m]):
            theirs = layer(d, layers)
            if mine is not None and theirs is not None and theirs > mine:
                problems.append(f"{m} (layer {mine}) imports {d} (layer {theirs})")
    return problems


def cycles(g: Graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
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
                found.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return sorted(found)


# --- the real package ------------------------------------------------------------------------


@cache
def real() -> Graph:
    return graph(PACKAGE)


def test_every_module_has_a_layer() -> None:
    assert check_placed(real(), LAYERS) == []


def test_only_operator_tools_import_operator_tools() -> None:
    assert check_operator_tools_private(real()) == []


def test_no_import_cycles() -> None:
    assert cycles(real()) == []


def test_base_modules_import_only_base_modules() -> None:
    g = real()
    base = {m for m in g if LAYERS.get(m) == BASE}
    assert {"errors", "config", "objects", "retry"} <= base
    assert check_layers(g, LAYERS, only=base) == []


def test_modules_import_only_their_layer_or_below() -> None:
    assert check_layers(real(), LAYERS) == []


def test_the_graph_sees_every_kind_of_import() -> None:
    """Spot checks of the real graph, so that a reader that missed a form would show."""
    g = real()
    assert "clock" in g["runtime"]  # from dicomflow.clock import utcnow
    assert {"keys", "log"} <= g["runtime"]  # from dicomflow import keys, log
    assert "ops.cli" in g["__main__"]


# --- each check fails on a bad package -------------------------------------------------------


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    package = tmp_path / "dicomflow"
    for name, text in {"__init__.py": "", "ops/__init__.py": "", **files}.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    return package


def test_checks_find_an_operator_import_a_cycle_and_an_upward_import(tmp_path: Path) -> None:
    package = _package(
        tmp_path,
        {
            "errors.py": "",
            # A base module reaching up, lazily, into a path and into the operator tools.
            "config.py": (
                "from dicomflow import errors\n"
                "def f():\n"
                "    from dicomflow.ingest import g\n"
                "    import importlib\n"
                "    return importlib.import_module('dicomflow.ops.status')\n"
            ),
            "ingest.py": "from dicomflow.config import f\n",
            "ops/status.py": "from . import tables\n",
            "ops/tables.py": "from dicomflow.ops.status import x\n",
            "stray.py": "",
            "__main__.py": "from dicomflow.ops import status\n",
        },
    )
    layers = {"__init__": BASE, "errors": BASE, "config": BASE, "ingest": 4, "gone": 2}
    g = graph(package)

    assert g["config"] == {"errors", "ingest", "ops.status"}
    assert g["ops.status"] == {"ops.tables"}
    assert check_placed(g, layers) == [
        "stray has no layer: add it to LAYERS",
        "LAYERS names gone, which does not exist",
    ]
    assert check_operator_tools_private(g) == ["config imports the operator tool ops.status"]
    assert cycles(g) == [["config", "ingest"], ["ops.status", "ops.tables"]]
    assert check_layers(g, layers, only={"config"}) == [
        "config (layer 1) imports ingest (layer 4)",
        "config (layer 1) imports ops.status (layer 6)",
    ]
    assert check_layers(g, layers) == check_layers(g, layers, only={"config"})


def test_type_checking_imports_are_followed(tmp_path: Path) -> None:
    package = _package(
        tmp_path,
        {
            "errors.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n"
                "    from dicomflow.runtime import Context\n"
            ),
            "runtime.py": "",
        },
    )
    g = graph(package)
    assert g["errors"] == {"runtime"}
    assert check_layers(g, {"errors": BASE, "runtime": 2}) == [
        "errors (layer 1) imports runtime (layer 2)"
    ]
