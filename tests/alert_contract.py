"""The alert contract in tests: ``dicomflow/alert.schema.json`` checked against every alert.

``install()`` (called by ``tests/conftest.py`` once per session) wraps the places where
alerts are made or read back:

- ``dicomflow.alerts.build_alert``: an alert the pipeline builds (the caller is a module
  of ``dicomflow``, ``localcloud`` or ``main``) must pass the *strict* schema: the
  published one with every object closed, so a detail field that the schema (and so
  ``docs/alerts.md``) does not describe fails too. An alert a test builds by hand, with
  made-up details to exercise the builder, must pass the envelope only.
- ``dicomflow.subscription.decode`` and ``localcloud.stack.Stack.drain_alerts``: alerts read
  back from Pub/Sub, which the function processes of the end-to-end tests built; the
  attributes, where read, must match the body.

Problems are collected, and the conftest hooks fail the test during whose setup or call
they appeared.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource

PIPELINE_MODULES = ("dicomflow.", "localcloud.", "main")
DOCS = Path(__file__).resolve().parents[1] / "docs" / "alerts.md"
KIND_HEADING = re.compile(r"^## ([a-z][a-z_]*)$", re.MULTILINE)


@functools.cache
def schema() -> dict[str, Any]:
    """The published schema, as shipped in the package."""
    text = (resources.files("dicomflow") / "alert.schema.json").read_text(encoding="utf-8")
    found: dict[str, Any] = json.loads(text)
    return found


def _closing(node: Any, bases: set[str]) -> None:
    """Close, in place, every object schema under ``node`` that lists its properties."""
    if isinstance(node, list):
        for item in node:
            _closing(item, bases)
        return
    if not isinstance(node, dict):
        return
    if "properties" in node and "additionalProperties" not in node:
        node["unevaluatedProperties"] = False
    for key, value in node.items():
        if key not in ("if", "then", "allOf"):
            _closing(value, bases)


@functools.cache
def strict_schema() -> dict[str, Any]:
    """The published schema with no room for undescribed properties.

    Defs that others extend (a ``$ref`` next to more ``properties``) stay open, since
    ``unevaluatedProperties`` inside them would not see the extension's properties; the
    schema that extends them is closed instead.
    """
    closed = copy.deepcopy(schema())
    defs: dict[str, Any] = closed["$defs"]
    bases = {
        str(node["$ref"]).removeprefix("#/$defs/")
        for node in _nodes(defs)
        if "$ref" in node and ("properties" in node or node in _details(defs))
    }
    closed["unevaluatedProperties"] = False
    for name, node in defs.items():
        if name in bases:
            for value in node.get("properties", {}).values():
                _closing(value, bases)
            continue
        _closing(node, bases)
    for node in _details(defs):
        if "anyOf" not in node:
            node["unevaluatedProperties"] = False
    return closed


def _details(defs: dict[str, Any]) -> list[dict[str, Any]]:
    return [node for name, node in defs.items() if name.startswith("details.")]


def _nodes(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _nodes(value)
    elif isinstance(node, list):
        for item in node:
            yield from _nodes(item)


def _validator(root: dict[str, Any], pointer: str = "") -> Draft202012Validator:
    registry: Registry[Any] = Registry().with_resource(root["$id"], Resource.from_contents(root))
    target = {"$ref": f"{root['$id']}#{pointer}"} if pointer else root
    return Draft202012Validator(target, registry=registry)


@functools.cache
def validators() -> dict[str, Draft202012Validator]:
    """``published``, ``strict``, ``envelope`` (no per-kind rules) and ``attributes``."""
    envelope = copy.deepcopy(schema())
    del envelope["allOf"]
    return {
        "published": _validator(schema()),
        "strict": _validator(strict_schema()),
        "envelope": _validator(envelope),
        "attributes": _validator(schema(), "/$defs/attributes"),
    }


def errors(which: str, instance: Any) -> list[str]:
    """What is wrong with ``instance`` under validator ``which``: one line per error."""
    found = sorted(validators()[which].iter_errors(instance), key=lambda e: list(e.path))
    return [f"{e.json_path}: {e.message}" for e in found]


def message_errors(body: Any, attributes: Mapping[str, Any] | None) -> list[str]:
    """A message as read from Pub/Sub: strict body, attributes, and the two agreeing."""
    problems = errors("strict", body)
    if attributes is not None:
        problems += [f"attributes {p}" for p in errors("attributes", dict(attributes))]
        for key in ("kind", "severity", "dicomStore", "alertId", "schemaVersion"):
            if isinstance(body, dict) and str(body.get(key)) != attributes.get(key):
                problems.append(f"attribute {key}={attributes.get(key)!r} differs from the body")
    return problems


class Checker:
    """What the wrapped builder and readers saw during the session."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.problems: list[str] = []
        self.kinds: Counter[str] = Counter()
        self.checked = 0
        self.by_tests: set[str] = set()  # alert ids of alerts tests built by hand

    def report(self, origin: str, body: Any, problems: list[str]) -> None:
        with self._lock:
            self.checked += 1
            if problems:
                kind = body.get("kind") if isinstance(body, dict) else None
                self.problems.append(f"{origin} built an invalid {kind!r} alert: {problems}")

    def take(self) -> list[str]:
        with self._lock:
            taken, self.problems = self.problems, []
            return taken


CHECKER = Checker()


def _caller_module(depth: int) -> str:
    return str(sys._getframe(depth).f_globals.get("__name__", ""))


def _wrap_builder(build: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(build)
    def checked_build(*args: Any, **kwargs: Any) -> Any:
        alert = build(*args, **kwargs)
        caller = _caller_module(2)
        body = alert.body()
        if caller.startswith(PIPELINE_MODULES):
            CHECKER.report(caller, body, message_errors(body, alert.attributes()))
            with CHECKER._lock:
                CHECKER.kinds[alert.kind] += 1
        else:
            with CHECKER._lock:
                CHECKER.by_tests.add(alert.alert_id)
            CHECKER.report(caller, body, errors("envelope", body))
        return alert

    checked_build.__wrapped_by_alert_contract__ = True  # type: ignore[attr-defined]
    return checked_build


def _read_back(body: dict[str, Any], attributes: Mapping[str, Any] | None, origin: str) -> None:
    if body.get("alertId") in CHECKER.by_tests:
        return
    clean = {k: v for k, v in body.items() if k not in ("attributes", "messageId")}
    CHECKER.report(origin, clean, message_errors(clean, attributes))


def install() -> None:
    """Wrap the builder and the readers (once per process)."""
    from dicomflow import alerts, subscription
    from localcloud.stack import Stack

    if getattr(alerts.build_alert, "__wrapped_by_alert_contract__", False):
        return
    alerts.build_alert = _wrap_builder(alerts.build_alert)
    decode = subscription.decode

    def checked_decode(received: dict[str, Any]) -> dict[str, Any]:
        body = decode(received)
        if body.get("kind") != subscription.UNDECODABLE:  # data that is no alert at all
            _read_back(
                body, body.get("attributes"), "a Pub/Sub message read by subscription.decode"
            )
        return body

    subscription.decode = checked_decode
    drain = Stack.drain_alerts

    def checked_drain(self: Stack) -> list[dict[str, Any]]:
        found = drain(self)
        for body in found:
            _read_back(body, None, "a Pub/Sub message drained from the local cloud")
        return found

    Stack.drain_alerts = checked_drain  # type: ignore[method-assign]


def detail_fields(kind: str) -> set[str]:
    """The ``details`` fields the schema describes for ``kind`` (every shape it allows)."""
    defs: dict[str, Any] = schema()["$defs"]

    def fields(node: Mapping[str, Any]) -> set[str]:
        found = set(node.get("properties", {}))
        if "$ref" in node:
            found |= fields(defs[str(node["$ref"]).removeprefix("#/$defs/")])
        for branch in node.get("anyOf", []):
            found |= fields(branch)
        return found

    return fields(defs[f"details.{kind}"])


def runbook_sections() -> dict[str, str]:
    """Runbook sections by kind: the text under each ``## <kind>`` heading."""
    text = DOCS.read_text(encoding="utf-8")
    headings = list(re.finditer(r"^## .*$", text, re.MULTILINE))
    found: dict[str, str] = {}
    for here, after in zip(headings, [*headings[1:], None], strict=True):
        match = KIND_HEADING.match(here.group(0))
        if match:
            found[match.group(1)] = text[here.end() : after.start() if after else len(text)]
    return found


def table_fields(section: str) -> set[str]:
    """The names in the first column of a section's ``details`` table."""
    return set(re.findall(r"^\| `([A-Za-z]+)` \|", section, re.MULTILINE))


def section_example(section: str) -> dict[str, Any]:
    match = re.search(r"```json\n(.*?)\n```", section, re.DOTALL)
    assert match, "the section has no JSON example"
    found: dict[str, Any] = json.loads(match.group(1))
    return found


def runbook_example(kind: str) -> dict[str, Any]:
    """The example message of ``kind``'s runbook section."""
    return section_example(runbook_sections()[kind])


def build_args(kind: str) -> dict[str, Any]:
    """``build_alert``'s arguments for the example of ``kind``'s runbook section."""
    body = runbook_example(kind)
    return {
        "kind": body["kind"],
        "subject": body["subject"],
        "severity": body["severity"],
        "store": body["dicomStore"],
        "details": body["details"],
        "now": datetime.fromisoformat(body["time"].replace("Z", "+00:00")),
    }
