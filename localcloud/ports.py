"""Loopback ports and readiness waits shared by the local services."""

from __future__ import annotations

import ctypes
import signal
import socket
import socketserver
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import TypeVar

from localcloud.errors import LocalCloudError

HOST = "127.0.0.1"
# Starts of a service that cannot bind port 0 itself, each on a newly picked port, before a
# port another process took in the meantime is reported as an error.
START_ATTEMPTS = 3

T = TypeVar("T")


class PortTaken(LocalCloudError):
    """A service could not bind the port picked for it: another process took it first."""


def free_port() -> int:
    """A port that was free on loopback a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def is_free(port: int) -> bool:
    """True when ``port`` can be bound on loopback now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def _taken(port: int, what: str, setting: str) -> PortTaken:
    if not setting:
        return PortTaken(f"port {port} for {what} is taken")
    return PortTaken(
        f"port {port} for {what} is taken; free it or set {setting} to another port "
        "(0 picks a free one)"
    )


def ensure_free(port: int, what: str, setting: str) -> None:
    """Raise a one-line LocalCloudError when ``port`` is taken."""
    if not is_free(port):
        raise _taken(port, what, setting)


def listening_socket(port: int, what: str, setting: str = "") -> socket.socket:
    """A loopback socket bound to ``port`` (0: any free one) and listening.

    ``PortTaken`` when ``port`` is taken, naming ``setting``, the setting that
    chose the port, when there is one.

    A service handed this socket serves on it without binding, so no other
    process can take the port between choosing it and serving on it.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as http.server does
    try:
        sock.bind((HOST, port))
    except OSError:
        sock.close()
        raise _taken(port, what, setting) from None
    sock.listen(128)
    return sock


def serve_on(server: socketserver.TCPServer, sock: socket.socket) -> None:
    """Make ``server``, made with ``bind_and_activate=False``, serve on ``sock``.

    ``sock`` is bound and listening already (see ``listening_socket``); the
    server owns it from now on and closes it with ``server_close``.
    """
    server.socket.close()
    server.socket = sock
    server.server_address = sock.getsockname()


def start_on_free_port(start: Callable[[int], T], attempts: int = START_ATTEMPTS) -> T:
    """``start(port)`` on a newly picked free port, again on another one after ``PortTaken``.

    For services that take a port number and bind it themselves: the port can be
    taken between the pick and their bind. The last ``PortTaken`` is raised after
    ``attempts`` starts.
    """
    for attempt in range(1, attempts + 1):
        try:
            return start(free_port())
        except PortTaken:
            if attempt == attempts:
                raise
    raise ValueError(f"attempts must be at least 1, got {attempts}")


def wait_http(url: str, timeout: float, what: str, alive: object = None) -> None:
    """Poll ``url`` until it answers with any HTTP status, or raise after ``timeout`` s.

    ``alive`` may be a callable returning False once the serving process died,
    so a crash fails fast instead of waiting out the timeout.
    """
    deadline = time.monotonic() + timeout
    while True:
        if callable(alive) and not alive():
            raise LocalCloudError(f"{what} exited during start-up (see its log)")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise LocalCloudError(f"{what} did not answer at {url} within {timeout:.0f} s")
        time.sleep(0.05)


def wait_bound(
    process: subprocess.Popen[bytes], port: int, url: str, timeout: float, what: str
) -> None:
    """Wait until ``process``, started to bind ``port`` itself, answers at ``url``.

    Raises ``PortTaken`` when it exited while the port is held by another process
    (it lost the race for the port), else the ``LocalCloudError`` of ``wait_http``.
    The process is left to the caller to stop.
    """
    try:
        wait_http(url, timeout, what, lambda: process.poll() is None)
    except LocalCloudError:
        if process.poll() is not None and not is_free(port):
            raise PortTaken(f"port {port} for {what} was taken before it bound it") from None
        raise


def die_with_parent() -> None:
    """``preexec_fn`` for service processes: SIGTERM them when their parent dies.

    A service started for a test or the supervisor must not outlive it, even
    when the parent is killed with SIGKILL and never runs its clean-up. Linux
    only (prctl PR_SET_PDEATHSIG); elsewhere a no-op.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
