"""No code of the project reaches into dicomweb-client's private attributes.

A private attribute (``client._session``, ``client._http_get``,
``dicomweb_client.web._Transaction``) can change in any release; the project
owns the ``requests.Session`` it hands to ``DICOMwebClient`` and uses that for
the requests the client has no public method for.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import dicomweb_client
import requests
from dicomweb_client.api import DICOMwebClient

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("dicomflow", "localcloud", "tests", "bench", "main.py")
LIBRARY = "dicomweb_client"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def client_privates() -> frozenset[str]:
    """Private attribute names of a DICOMwebClient (its class and an instance)."""
    client = DICOMwebClient(url="http://127.0.0.1:1/dicomWeb", session=requests.Session())
    return frozenset(n for n in {*dir(DICOMwebClient), *vars(client)} if _private(n))


def module_privates() -> frozenset[str]:
    """Private names defined at module level anywhere in dicomweb_client."""
    names: set[str] = set()
    for info in pkgutil.walk_packages(dicomweb_client.__path__, f"{LIBRARY}."):
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # an extra that is not installed
            continue
        names.update(n for n in vars(module) if _private(n))
    return frozenset(names)


def _dotted(node: ast.expr) -> str:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def violations(source: str, privates: frozenset[str]) -> list[tuple[int, str]]:
    """(line, text) of each access to a private of dicomweb-client in ``source``.

    An attribute named like one of the client's privates counts unless it is read
    on ``self`` or ``cls`` (a class of the project's own); so do private names
    imported from, or read on, a ``dicomweb_client`` module.
    """
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(LIBRARY):
            found += [(node.lineno, a.name) for a in node.names if _private(a.name)]
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if node.attr in privates or _dotted(owner).startswith(LIBRARY):
                found.append((node.lineno, _dotted(node)))
    return sorted(found)


def test_no_code_reads_a_private_of_dicomweb_client() -> None:
    privates = client_privates() | module_privates()
    assert {"_session", "_http_get", "_get_instances_url", "_Transaction"} <= privates
    found: list[str] = []
    for top in SCANNED:
        path = ROOT / top
        for file in [path] if path.is_file() else sorted(path.rglob("*.py")):
            for line, text in violations(file.read_text(), privates):
                found.append(f"{file.relative_to(ROOT)}:{line}: {text}")
    assert found == []


def test_the_check_finds_each_kind_of_access() -> None:
    privates = client_privates() | module_privates()
    planted = (
        "from dicomweb_client.web import _Transaction\n"
        "import dicomweb_client.web\n"
        "def f(client, ctx):\n"
        "    client._session.close()\n"
        "    ctx.dicomweb()._http_get('u')\n"
        "    return dicomweb_client.web._Transaction.RETRIEVE\n"
        "class Own:\n"
        "    def g(self):\n"
        "        return self._session\n"
    )
    assert [line for line, _ in violations(planted, privates)] == [1, 4, 5, 6]
