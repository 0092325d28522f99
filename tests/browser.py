"""Headless Chromium through the DevTools protocol: load a page, collect errors, screenshot.

``render(path)`` starts Debian's ``chromium`` offline (no network features, a
throwaway profile), opens ``file://path`` in a new target and records, until
the load event and a short quiet period:

- ``Runtime.exceptionThrown`` (uncaught script errors),
- ``Runtime.consoleAPICalled`` of type error or assert,
- ``Log.entryAdded`` of level error (failed loads, CSP and parser errors),

then evaluates the given expressions in the page and takes a screenshot.
``find_chromium()`` is None when no browser is installed; tests skip then.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import websocket

_LISTENING = re.compile(r"DevTools listening on (ws://\S+)")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class Rendered:
    errors: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)
    screenshot: bytes = b""


class _Session:
    def __init__(self, url: str) -> None:
        self.ws = websocket.create_connection(url, timeout=30, suppress_origin=True)
        self.ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None, session: str = "") -> Any:
        call_id = next(self.ids)
        message: dict[str, Any] = {"id": call_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self.ws.send(json.dumps(message))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == call_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        if any(e.get("method") == method for e in self.events):
            return True
        while time.monotonic() < deadline:
            self.ws.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                event = json.loads(self.ws.recv())
            except websocket.WebSocketTimeoutException:
                break
            self.events.append(event)
            if event.get("method") == method:
                return True
        return False

    def drain(self, seconds: float) -> None:
        self.wait_for("__never__", seconds)

    def close(self) -> None:
        self.ws.close()


def _errors(events: list[dict[str, Any]]) -> list[str]:
    found = []
    for event in events:
        method, params = event.get("method"), event.get("params") or {}
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails") or {}
            found.append(f"exception: {details.get('text')} {details.get('exception')}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = [a.get("value", a.get("description")) for a in params.get("args") or []]
            found.append(f"console.{params.get('type')}: {args}")
        elif method == "Log.entryAdded":
            entry = params.get("entry") or {}
            if entry.get("level") == "error":
                found.append(f"log: {entry.get('source')}: {entry.get('text')} {entry.get('url')}")
    return found


def render(
    page: Path, expressions: dict[str, str], width: int = 1400, height: int = 1000
) -> Rendered:
    """Load ``page`` in headless Chromium; errors, expression values and a PNG screenshot."""
    binary = find_chromium()
    if binary is None:
        raise RuntimeError("chromium is not installed")
    with tempfile.TemporaryDirectory(prefix="dicomflow-chromium-") as profile:
        process = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert process.stderr is not None
            url = None
            deadline = time.monotonic() + 60
            while url is None and time.monotonic() < deadline:
                line = process.stderr.readline()
                if not line and process.poll() is not None:
                    raise RuntimeError(f"chromium exited with {process.returncode}")
                match = _LISTENING.search(line)
                url = match.group(1) if match else None
            if url is None:
                raise RuntimeError("chromium did not open its DevTools port within 60 s")
            # Keep reading stderr so that chromium never blocks on a full pipe.
            reader = threading.Thread(target=process.stderr.read, daemon=True)
            reader.start()
            try:
                return _render(url, page, expressions, width, height)
            finally:
                process.terminate()
                process.wait(timeout=20)
                reader.join(timeout=20)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            if process.stderr is not None:
                process.stderr.close()


def _render(url: str, page: Path, expressions: dict[str, str], width: int, height: int) -> Rendered:
    browser = _Session(url)
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Log"):
            browser.send(f"{domain}.enable", session=session)
        browser.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        browser.events.clear()
        browser.send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
        if not browser.wait_for("Page.loadEventFired", 30):
            raise RuntimeError("the page did not finish loading within 30 s")
        browser.drain(0.5)  # late errors (deferred scripts, failed sub-resources)
        result = Rendered(errors=_errors(browser.events))
        for name, expression in expressions.items():
            value = browser.send(
                "Runtime.evaluate",
                {"expression": expression, "returnByValue": True},
                session=session,
            )
            if "exceptionDetails" in value:
                result.errors.append(f"evaluate {name}: {value['exceptionDetails'].get('text')}")
            result.values[name] = (value.get("result") or {}).get("value")
        shot = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)
        result.screenshot = base64.b64decode(shot["data"])
        return result
    finally:
        browser.close()
