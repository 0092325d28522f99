"""The plumbing shared by localcloud's loopback HTTP proxies (the fault proxy, the storage front).

A ``LoopbackProxy`` listens on a loopback port with one thread per client
connection. Each connection keeps its own keep-alive connection to the
upstream, so a proxy adds no TCP handshakes. Subclasses override ``handle``:
it gets the whole request and the connection's ``Upstream``, and returns the
``Reply`` to send. ``Location`` headers that point at the upstream are
rewritten to point at the proxy, so a resumable upload's later requests come
back through it.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from localcloud.ports import HOST, serve_on

HOP_HEADERS = frozenset(
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
STATUS_TEXT = {
    304: "NOT_MODIFIED",
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    412: "FAILED_PRECONDITION",
    429: "RESOURCE_EXHAUSTED",
    503: "UNAVAILABLE",
}


@dataclass
class Request:
    """One client request, body read in full."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    path: str = field(init=False)
    query: str = field(init=False)
    params: dict[str, list[str]] = field(init=False)

    def __post_init__(self) -> None:
        parts = urlsplit(self.target)
        self.path, self.query = parts.path, parts.query
        self.params = parse_qs(parts.query)

    def param(self, name: str) -> str | None:
        values = self.params.get(name)
        return values[0] if values else None

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        return next((v for k, v in self.headers if k.lower() == lowered), None)


@dataclass
class Reply:
    """A response to send back: status, headers (no hop-by-hop, no length) and body."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        return next((v for k, v in self.headers if k.lower() == lowered), None)

    def json(self) -> Any:
        return json.loads(self.body)

    def with_json(self, value: Any) -> Reply:
        return Reply(self.status, self.reason, self.headers, json.dumps(value).encode())


def google_error(status: int, message: str, errors: list[dict[str, str]] | None = None) -> Reply:
    """A reply in the JSON error shape of Google APIs, which the client libraries parse."""
    error: dict[str, Any] = {
        "code": status,
        "message": message,
        "status": STATUS_TEXT.get(status, "UNKNOWN"),
    }
    if errors is not None:
        error["errors"] = errors
    body = json.dumps({"error": error}).encode() if status != 304 else b""
    return Reply(status, http.client.responses.get(status, ""), _JSON, body)


_JSON = [("Content-Type", "application/json; charset=UTF-8")]


class Upstream:
    """One keep-alive HTTP connection to the upstream, owned by one client connection."""

    def __init__(self, host: str, port: int) -> None:
        self._address = (host, port)
        self._conn: http.client.HTTPConnection | None = None

    def send(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes = b""
    ) -> Reply:
        """Send one request and read the whole response.

        A keep-alive connection the upstream has closed fails on first use, so
        one failure is retried on a fresh connection.
        """
        for attempt in range(2):
            conn = self._conn
            if conn is None:
                conn = self._conn = http.client.HTTPConnection(*self._address, timeout=600)
            try:
                conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
                for key, value in headers:
                    conn.putheader(key, value)
                if not any(k.lower() == "host" for k, _ in headers):
                    conn.putheader("Host", f"{self._address[0]}:{self._address[1]}")
                conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body)
                response = conn.getresponse()
                data = response.read()
                break
            except (http.client.HTTPException, OSError):
                self.close()
                if attempt:
                    raise
        kept = [
            (k, v)
            for k, v in response.getheaders()
            if k.lower() not in HOP_HEADERS and k.lower() != "content-length"
        ]
        return Reply(response.status, response.reason, kept, data)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # A client killed mid-request (chaos runs do that) resets its connection; not news.
        pass


class LoopbackProxy:
    """A threaded loopback HTTP server that hands each request to ``handle``."""

    def __init__(self, upstream: str, port: int = 0, sock: socket.socket | None = None) -> None:
        """Listen on ``port`` (0: any free one), or serve on ``sock``, bound and listening."""
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"upstream must be http://HOST:PORT, got {upstream!r}")
        self.upstream_url = f"http://{parts.hostname}:{parts.port}"
        self._upstream_address = (parts.hostname, parts.port)
        if sock is None:
            self._server = _Server((HOST, port), self._handler())
        else:
            self._server = _Server((HOST, 0), self._handler(), bind_and_activate=False)
            serve_on(self._server, sock)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self._server.server_address[1]}"

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> LoopbackProxy:
        self._thread.start()
        return self

    def serve(self) -> None:
        """Serve in the calling thread until ``stop`` (or the process ends)."""
        self._server.serve_forever()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()

    def handle(self, request: Request, upstream: Upstream) -> Reply:
        """Answer one request; the default forwards it unchanged."""
        return upstream.send(request.method, request.target, request.headers, request.body)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True
            upstream: Upstream | None = None

            def finish(self) -> None:
                super().finish()
                if self.upstream is not None:
                    self.upstream.close()

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = [
                    (k, v)
                    for k, v in self.headers.items()
                    if k.lower() not in HOP_HEADERS and k.lower() != "content-length"
                ]
                if self.upstream is None:
                    self.upstream = Upstream(*proxy._upstream_address)
                reply = proxy.handle(Request(self.command, self.path, headers, body), self.upstream)
                self.send_response_only(reply.status, reply.reason or None)
                for key, value in reply.headers:
                    if key.lower() == "location" and value.startswith(proxy.upstream_url):
                        value = proxy.url + value[len(proxy.upstream_url) :]
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(reply.body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _relay

        return Handler
