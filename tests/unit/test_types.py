"""The package has no ``Any`` annotations except the one alias for decoded JSON.

``typing.Any`` switches mypy off for whatever it touches, so ``dicomflow/`` writes
``Context``, ``JSON`` (``dicomflow.json_types``), a precise type, or ``object`` (narrowed
with ``isinstance``) instead.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "dicomflow"
ALLOWED = PACKAGE / "json_types.py"


def _in_string(text: str) -> bool:
    """Whether a string annotation (``"dict[str, Any]"``) names ``Any``."""
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return False
    return any(_names_any(node) for node in ast.walk(tree))


def _names_any(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return node.id == "Any"
    if isinstance(node, ast.Attribute):
        return node.attr == "Any"
    if isinstance(node, ast.alias):
        return node.name.split(".")[-1] == "Any"
    return False


def _annotations(tree: ast.AST) -> list[ast.expr]:
    """Every annotation in ``tree``: arguments, returns, and annotated assignments."""
    found: list[ast.expr] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.arg) and node.annotation is not None:
            found.append(node.annotation)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.returns:
            found.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            found.append(node.annotation)
    return found


def any_uses(source: str) -> list[int]:
    """Lines of ``source`` that name ``Any``: in code, imports, or string annotations."""
    tree = ast.parse(source)
    lines = {getattr(node, "lineno", 0) for node in ast.walk(tree) if _names_any(node)}
    for annotation in _annotations(tree):
        for node in ast.walk(annotation):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                lines.update([node.lineno] if _in_string(node.value) else [])
    return sorted(lines)


def test_no_any_in_the_package_outside_the_json_alias() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != ALLOWED
        for line in any_uses(path.read_text())
    ]
    assert found == [], "Any outside dicomflow/json_types.py:\n" + "\n".join(found)


def test_the_alias_is_the_one_place_with_any() -> None:
    assert any_uses(ALLOWED.read_text()) != []


def test_the_check_finds_each_way_of_writing_any() -> None:
    planted = (
        "from typing import Any\n"
        "import typing\n"
        "def f(ctx: Any, **changes: typing.Any) -> None: ...\n"
        "def g() -> 'dict[str, Any]': ...\n"
        "x: list[Any] = []\n"
        "def h(value: object) -> JSON: ...\n"
        "Anything = 1\n"
    )
    assert any_uses(planted) == [1, 3, 4, 5]
