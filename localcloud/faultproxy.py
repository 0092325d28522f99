"""A counting, fault-injecting HTTP proxy for loopback services (benchmarks and chaos runs).

``FaultProxy(upstream)`` listens on a free loopback port and forwards every
request to ``upstream`` (e.g. fake-gcs-server). It counts requests by a
coarse operation name (``classify``), and, with ``fault_rate`` > 0, answers
that share of requests itself with 429 or 503 in Google's JSON error shape
*before* forwarding, as a throttling front end does: a refused request had
no effect, so a retry is always safe.

Point a client at ``proxy.url`` instead of the upstream (for the functions:
``STORAGE_EMULATOR_HOST`` or ``DICOMFLOW_HEALTHCARE_ENDPOINT``).
"""

from __future__ import annotations

import http.client
import json
import random
import re
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from localcloud.ports import HOST

_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
    }
)
_STATUS_TEXT = {429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}


def storage_operation(method: str, path: str, query: str) -> str:
    """A Cloud Storage JSON API request as an operation name (for counts and prices).

    Names: ``objects.insert``, ``objects.get`` (metadata), ``objects.download``,
    ``objects.list``, ``objects.rewrite``, ``objects.copy``, ``objects.delete``,
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
    if method == "GET":
        return "objects.download" if params.get("alt") == ["media"] else "objects.get"
    if method == "DELETE":
        return "objects.delete"
    if method in ("PATCH", "PUT"):
        return "objects.patch"
    return "other"


_MULTIPART_NAME = re.compile(rb'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')


def storage_area(method: str, path: str, query: str, body: bytes = b"") -> str:
    """Where in a bucket a Cloud Storage request goes: ``bucket:top`` (``bucket:state/x``).

    ``top`` is the object name's (or listing prefix's) first path part, two parts under
    ``state/``; it breaks the call counts down by the kind of object (ledger entries,
    staged copies, markers) for the benchmarks.
    """
    params = parse_qs(query)
    for lead in ("/upload/storage/v1/b/", "/download/storage/v1/b/", "/storage/v1/b/"):
        if path.startswith(lead):
            rest = path[len(lead) :].split("/")
            break
    else:
        return "other"
    bucket = unquote(rest[0])
    if len(rest) >= 3 and rest[1] == "o" and rest[2]:
        name = unquote(rest[2])
    else:
        name = (params.get("name") or params.get("prefix") or [""])[0]
        # A multipart upload names its object in the JSON metadata part of the body.
        found = _MULTIPART_NAME.search(body[:4096]) if not name and body else None
        if found:
            name = json.loads(b'"' + found.group(1) + b'"')
    parts = name.split("/")
    top = "/".join(parts[:2]) if parts[0] == "state" and len(parts) > 2 else parts[0]
    return f"{bucket}:{top}"


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


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # A client killed mid-request (chaos runs do that) resets its connection; not news.
        pass


class FaultProxy:
    """Forwards loopback HTTP to ``upstream``; counts requests and injects 429/503 faults."""

    def __init__(
        self,
        upstream: str,
        classify: Callable[[str, str, str], str] = storage_operation,
        area: Callable[[str, str, str, bytes], str] | None = None,
        fault_rate: float = 0.0,
        fault_statuses: tuple[int, ...] = (429, 503),
        seed: int | None = None,
    ) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"upstream must be http://HOST:PORT, got {upstream!r}")
        self._upstream = (parts.hostname, parts.port)
        self._classify = classify
        self._area = area
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self.fault_rate = fault_rate
        self.fault_statuses = fault_statuses
        self.counts: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        # "operation status" -> responses, injected ones included.
        self.statuses: Counter[str] = Counter()
        # "operation area" -> requests, when an ``area`` function is given (storage_area).
        self.areas: Counter[str] = Counter()
        self._server = _Server((HOST, 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self._server.server_address[1]}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Copies of ``counts``, ``faults`` and ``statuses``."""
        with self._lock:
            return {
                "counts": dict(self.counts),
                "faults": dict(self.faults),
                "statuses": dict(self.statuses),
                "areas": dict(self.areas),
            }

    def reset(self) -> None:
        with self._lock:
            self.counts.clear()
            self.faults.clear()
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

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True
            upstream: http.client.HTTPConnection | None = None

            def finish(self) -> None:
                super().finish()
                if self.upstream is not None:
                    self.upstream.close()

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                operation = proxy._classify(self.command, parts.path, parts.query)
                area = (
                    proxy._area(self.command, parts.path, parts.query, body)
                    if proxy._area
                    else None
                )
                status = proxy._decide(operation, area)
                if status is not None:
                    proxy._answered(operation, status)
                    payload = json.dumps(
                        {
                            "error": {
                                "code": status,
                                "message": "injected by the fault proxy",
                                "status": _STATUS_TEXT.get(status, "UNKNOWN"),
                            }
                        }
                    ).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
                for attempt in range(2):
                    conn = self.upstream
                    if conn is None:
                        conn = self.upstream = http.client.HTTPConnection(
                            *proxy._upstream, timeout=600
                        )
                    try:
                        conn.request(self.command, self.path, body=body, headers=headers)
                        response = conn.getresponse()
                        data = response.read()
                        break
                    except (http.client.HTTPException, OSError):
                        conn.close()
                        self.upstream = None
                        if attempt:
                            raise
                proxy._answered(operation, response.status)
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in _HOP_HEADERS and key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _relay

        return Handler
