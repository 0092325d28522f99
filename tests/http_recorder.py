"""A loopback HTTP endpoint for tests: it records POSTs and answers with scripted statuses."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from localcloud.ports import HOST


class Recorder:
    """A loopback HTTP endpoint that records POSTs and answers with scripted statuses."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses  # one per request; the last one repeats
        self.requests: list[tuple[str, dict[str, str], dict[str, Any]]] = []
        self._lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with recorder._lock:
                    recorder.requests.append((self.path, dict(self.headers), body))
                    index = min(len(recorder.requests), len(recorder.statuses)) - 1
                    status = recorder.statuses[index]
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer((HOST, 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://{HOST}:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def wait_for(self, count: int, timeout: float) -> list[dict[str, Any]]:
        """The bodies of the first ``count`` requests; fails after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.requests) >= count:
                    return [body for _, _, body in self.requests]
            time.sleep(0.05)
        pytest.fail(f"{len(self.requests)} requests within {timeout} s, wanted {count}")

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
