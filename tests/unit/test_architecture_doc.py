"""docs/architecture.md stays true to the code: its layer table names every module of
``dicomflow`` once (tests/unit/test_layout.py checks the imports against it), module
docstrings of ``dicomflow`` and ``localcloud`` stay short, and every
``docs/<file>.md#anchor`` the code points at is a heading of that document."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "dicomflow"
DOC = ROOT / "docs" / "architecture.md"
LINK = re.compile(r"docs/([\w-]+\.md)#([a-z0-9-]+)")
SOURCES = (PACKAGE, ROOT / "localcloud")
# A module docstring says what the module is for; the design lives in the document.
MAX_DOCSTRING_LINES = 25


def modules() -> dict[str, Path]:
    """Dotted name inside the package (``ops.cli``) -> file, for every module."""
    found: dict[str, Path] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        if name != "__init__" and not name.endswith(".__init__"):
            found[name] = path
    return found


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(doc: Path = DOC) -> set[str]:
    lines = doc.read_text(encoding="utf-8").splitlines()
    return {slug(line.lstrip("#")) for line in lines if re.match(r"#{1,6} ", line)}


def layers() -> dict[str, int]:
    """Module -> layer number, from the document's layer table."""
    found: dict[str, int] = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        row = re.match(r"\| (\d)\. [^|]+\| ([^|]+) \|", line)
        if not row:
            continue
        for name in re.findall(r"`([\w/]+)`", row.group(2)):
            if name == "ops/":
                continue
            module = f"ops.{name}" if row.group(1) == "6" and name != "__main__" else name
            assert module not in found, f"{module} is in the layer table twice"
            found[module] = int(row.group(1))
    return found


def test_the_layer_table_names_every_module_once() -> None:
    table = layers()
    assert sorted(table) == sorted(modules())


def test_module_docstrings_are_short_and_point_at_headings() -> None:
    files = [p for root in SOURCES for p in sorted(root.rglob("*.py"))]
    for path in files:
        text = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")), clean=False)
        where = path.relative_to(ROOT).as_posix()
        assert text or not path.is_relative_to(PACKAGE), f"{where} has no docstring"
        assert len((text or "").splitlines()) <= MAX_DOCSTRING_LINES, where
    headings = {doc.name: anchors(doc) for doc in (ROOT / "docs").glob("*.md")}
    linked = {
        (path.relative_to(ROOT).as_posix(), doc, anchor)
        for path in [*files, ROOT / "main.py"]
        for doc, anchor in LINK.findall(path.read_text(encoding="utf-8"))
    }
    assert any(doc == DOC.name for _, doc, _ in linked), "no module points at the document"
    broken = [link for link in sorted(linked) if link[2] not in headings.get(link[1], set())]
    assert broken == []
