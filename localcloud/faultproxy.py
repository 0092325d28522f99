"""A counting, fault-injecting HTTP proxy for loopback services (benchmarks and chaos runs).

``FaultProxy(upstream)`` listens on a free loopback port and forwards every
request to ``upstream`` (e.g. fake-gcs-server). It counts requests by a
coarse operation name (``classify``), and, with ``fault_rate`` > 0, answers
that share of requests itself with 429 or 503 in Google's JSON error shape
*before* forwarding, as a throttling front end does: a refused request had
no effect, so a retry is always safe.

With ``after_fault_rate`` > 0 it also lets that share of writes (POST, PUT,
PATCH, DELETE) that succeed upstream take effect and then answers 503, as when a response
is lost on the way back: the retry meets the client's own write (a 412 on a
create-if-absent, a 404 on a delete). Those are counted in ``after_faults``,
apart from ``faults``.

``refuse`` (settable while running) answers chosen requests itself, before
forwarding, with a status of its choice: ``refuse = lambda method, path, operation:
403 if operation == "objects.download" else None`` takes read permission away,
as a changed IAM policy does. Those are counted in ``refused``. ``lose`` (settable
too) picks writes whose answer is lost after they took effect, by operation and area
(``lose = lambda operation, area: ...``), beside ``after_fault_rate``.

Point a client at ``proxy.url`` instead of the upstream (for the functions:
``STORAGE_EMULATOR_HOST`` or ``DICOMFLOW_HEALTHCARE_ENDPOINT``).
"""

from __future__ import annotations

import json
import random
import re
import threading
from collections import Counter
from collections.abc import Callable
from urllib.parse import parse_qs, unquote

from localcloud.proxy import LoopbackProxy, Reply, Request, Upstream, google_error


def storage_operation(method: str, path: str, query: str) -> str:
    """A Cloud Storage JSON API request as an operation name (for counts and prices).

    Names: ``objects.insert``, ``objects.get`` (metadata), ``objects.download``,
    ``objects.list``, ``objects.rewrite``, ``objects.copy``, ``objects.compose``,
    ``objects.delete``,
    ``objects.patch``, ``buckets.*`` or ``other``.
    """
    params = parse_qs(query)
    if path.startswith("/upload/storage/v1/b/"):
        return "objects.insert"
    if path.startswith("/download/storage/v1/b/"):
        return "objects.download"
    if not path.startswith("/storage/v1/b"):
        return "other"
    rest = path[len("/storage/v1/b") :].strip("/").split("/")
    if len(rest) <= 1:
        return f"buckets.{'list' if not rest[0] else method.lower()}"
    if rest[1] != "o":
        return "other"
    if len(rest) == 2:
        return "objects.list" if method == "GET" else "objects.insert"
    joined = "/".join(rest[2:])
    if "/rewriteTo/" in joined:
        return "objects.rewrite"
    if "/copyTo/" in joined:
        return "objects.copy"
    if joined.endswith("/compose"):
        return "objects.compose"
    if method == "GET":
        return "objects.download" if params.get("alt") == ["media"] else "objects.get"
    if method == "DELETE":
        return "objects.delete"
    if method in ("PATCH", "PUT"):
        return "objects.patch"
    return "other"


_MULTIPART_NAME = re.compile(rb'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')


def storage_object(method: str, path: str, query: str, body: bytes = b"") -> tuple[str, str]:
    """(bucket, object name) of a Cloud Storage request: a listing's prefix, and for a
    rewrite or copy its destination; ("", "") for requests that name no bucket."""
    params = parse_qs(query)
    for lead in ("/upload/storage/v1/b/", "/download/storage/v1/b/", "/storage/v1/b/"):
        if path.startswith(lead):
            rest = path[len(lead) :].split("/")
            break
    else:
        return "", ""
    for verb in ("rewriteTo", "copyTo"):
        if verb in rest and len(rest) > rest.index(verb) + 4:
            rest = rest[rest.index(verb) + 2 :]
    bucket = unquote(rest[0])
    if len(rest) >= 3 and rest[1] == "o" and rest[2]:
        return bucket, unquote(rest[2])
    name = (params.get("name") or params.get("prefix") or [""])[0]
    # A multipart upload names its object in the JSON metadata part of the body.
    found = _MULTIPART_NAME.search(body[:4096]) if not name and body else None
    if found:
        name = json.loads(b'"' + found.group(1) + b'"')
    return bucket, name


def storage_area(method: str, path: str, query: str, body: bytes = b"") -> str:
    """Where in a bucket a Cloud Storage request goes: ``bucket:top`` (``bucket:state/x``).

    ``top`` is the object name's (or listing prefix's) first path part, two parts under
    ``state/``; it breaks the call counts down by the kind of object (staging copies,
    late claims, markers) for the benchmarks. A rewrite or copy counts at its source.
    """
    if "/rewriteTo/" in path or "/copyTo/" in path:
        path = path.split("/rewriteTo/", 1)[0].split("/copyTo/", 1)[0]
    bucket, name = storage_object(method, path, query, body)
    if not bucket:
        return "other"
    parts = name.split("/")
    top = "/".join(parts[:2]) if parts[0] == "state" and len(parts) > 2 else parts[0]
    return f"{bucket}:{top}"


_WINDOW_OR_BATCH = re.compile(r"\d{8}T\d{6}[ZL](-[01]{1,6})?")
_KEY_OR_ID = re.compile(r"\b[01]{6}[0-9a-f]{40}\b|\b[0-9a-f]{32}\b")


def storage_shape(method: str, path: str, query: str, body: bytes = b"") -> str:
    """``bucket:name`` of a Cloud Storage request with window and batch ids, file keys
    and alert ids written as ``<w>`` and ``<id>``: one string per kind of object
    (``staging:state/batch/<w>/operation.json``), for faults aimed at each step."""
    bucket, name = storage_object(method, path, query, body)
    if not bucket:
        return "other"
    return f"{bucket}:{_KEY_OR_ID.sub('<id>', _WINDOW_OR_BATCH.sub('<w>', name))}"


def healthcare_operation(method: str, path: str, query: str) -> str:
    """A Healthcare API request as an operation name: ``import``, ``operations.get``..."""
    if path.startswith("/_emulator"):
        return "emulator"
    if "/dicomWeb/" in path:
        if method == "POST":
            return "dicomWeb.store"
        if method == "DELETE":
            return "dicomWeb.delete"
        tail = path.rsplit("/", 1)[-1]
        return (
            "dicomWeb.search" if tail in ("studies", "series", "instances") else "dicomWeb.retrieve"
        )
    if path.endswith(":import"):
        return "import"
    if path.endswith(":export"):
        return "export"
    if "/operations" in path:
        if path.endswith("/operations"):
            return "operations.list"
        return "operations.cancel" if path.endswith(":cancel") else "operations.get"
    return f"other.{method.lower()}"


_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class FirstOfEach:
    """A ``lose`` policy: the first write of each kind (operation and the area's object
    part, buckets aside) loses its answer; ``lost`` lists those kinds in order."""

    def __init__(self) -> None:
        self.lost: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def __call__(self, operation: str, area: str | None) -> bool:
        kind = (operation, (area or "").split(":", 1)[-1])
        with self._lock:
            if kind in self.lost:
                return False
            self.lost.append(kind)
            return True


class FaultProxy(LoopbackProxy):
    """Forwards loopback HTTP to ``upstream``; counts requests and injects 429/503 faults."""

    def __init__(
        self,
        upstream: str,
        classify: Callable[[str, str, str], str] = storage_operation,
        area: Callable[[str, str, str, bytes], str] | None = None,
        fault_rate: float = 0.0,
        fault_statuses: tuple[int, ...] = (429, 503),
        seed: int | None = None,
        after_fault_rate: float = 0.0,
    ) -> None:
        super().__init__(upstream)
        self._classify = classify
        self._area = area
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self.fault_rate = fault_rate
        self.fault_statuses = fault_statuses
        self.after_fault_rate = after_fault_rate
        self.counts: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        # Writes forwarded, then answered with 503 (``after_fault_rate``).
        self.after_faults: Counter[str] = Counter()
        # (method, path, operation) -> a status to answer without forwarding, or None.
        self.refuse: Callable[[str, str, str], int | None] | None = None
        self.refused: Counter[str] = Counter()
        # (operation, area) -> True to lose the answer of a write that took effect.
        self.lose: Callable[[str, str | None], bool] | None = None
        # "operation status" -> responses, injected ones included.
        self.statuses: Counter[str] = Counter()
        # "operation area" -> requests, when an ``area`` function is given (storage_area).
        self.areas: Counter[str] = Counter()

    def start(self) -> FaultProxy:
        super().start()
        return self

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Copies of ``counts``, ``faults``, ``after_faults``, ``refused``, ``statuses`` and
        ``areas``."""
        with self._lock:
            return {
                "counts": dict(self.counts),
                "faults": dict(self.faults),
                "after_faults": dict(self.after_faults),
                "refused": dict(self.refused),
                "statuses": dict(self.statuses),
                "areas": dict(self.areas),
            }

    def reset(self) -> None:
        with self._lock:
            self.counts.clear()
            self.faults.clear()
            self.after_faults.clear()
            self.refused.clear()
            self.statuses.clear()
            self.areas.clear()

    def _answered(self, operation: str, status: int) -> None:
        with self._lock:
            self.statuses[f"{operation} {status}"] += 1

    def _decide(self, operation: str, area: str | None = None) -> int | None:
        with self._lock:
            self.counts[operation] += 1
            if area is not None:
                self.areas[f"{operation} {area}"] += 1
            if self.fault_rate > 0 and self._random.random() < self.fault_rate:
                self.faults[operation] += 1
                return self._random.choice(self.fault_statuses)
            return None

    def _lose_response(
        self, method: str, operation: str, status: int, area: str | None = None
    ) -> bool:
        # Only a write that took effect has an answer worth losing.
        if method not in _WRITES or not 200 <= status < 300:
            return False
        lose = self.lose
        if lose is not None and lose(operation, area):
            with self._lock:
                self.after_faults[operation] += 1
            return True
        with self._lock:
            # No draw at rate 0, so the before-forwarding faults keep their seeded sequence.
            if self.after_fault_rate > 0 and self._random.random() < self.after_fault_rate:
                self.after_faults[operation] += 1
                return True
            return False

    def handle(self, request: Request, upstream: Upstream) -> Reply:
        operation = self._classify(request.method, request.path, request.query)
        area = (
            self._area(request.method, request.path, request.query, request.body)
            if self._area
            else None
        )
        refuse = self.refuse
        refusal = refuse(request.method, request.path, operation) if refuse else None
        if refusal is not None:
            with self._lock:
                self.counts[operation] += 1
                self.refused[operation] += 1
            self._answered(operation, refusal)
            return google_error(refusal, "refused by the fault proxy")
        status = self._decide(operation, area)
        if status is not None:
            self._answered(operation, status)
            return google_error(status, "injected by the fault proxy")
        reply = super().handle(request, upstream)
        if self._lose_response(request.method, operation, reply.status, area):
            self._answered(operation, 503)
            return google_error(503, "injected by the fault proxy after the write took effect")
        self._answered(operation, reply.status)
        return reply
