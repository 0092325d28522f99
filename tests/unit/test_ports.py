"""Loopback ports: sockets bound by the starter, and starts again on another port when taken."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from localcloud.errors import LocalCloudError
from localcloud.ports import (
    HOST,
    START_ATTEMPTS,
    PortTaken,
    listening_socket,
    serve_on,
    start_on_free_port,
    wait_bound,
)


def test_each_start_gets_a_new_port_and_the_last_port_taken_is_raised() -> None:
    tried: list[int] = []

    def start(port: int) -> str:
        tried.append(port)
        raise PortTaken(f"port {port} taken")

    with pytest.raises(PortTaken) as info:
        start_on_free_port(start)
    assert str(info.value) == f"port {tried[-1]} taken"
    assert len(tried) == START_ATTEMPTS
    assert len(set(tried)) == START_ATTEMPTS and all(p > 0 for p in tried)


def test_other_errors_are_not_retried() -> None:
    tried: list[int] = []

    def start(port: int) -> str:
        tried.append(port)
        raise ValueError("bad knob")

    with pytest.raises(ValueError, match="bad knob"):
        start_on_free_port(start)
    assert len(tried) == 1


def test_a_listening_socket_holds_its_port_against_other_binds() -> None:
    with listening_socket(0, "a service", "SERVICE_PORT") as held:
        host, port = held.getsockname()
        assert host == HOST and port > 0
        with socket.socket() as other, pytest.raises(OSError):
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            other.bind((HOST, port))
        with pytest.raises(PortTaken, match=f"^port {port} for an instance is taken$"):
            listening_socket(port, "an instance")  # no setting chose the port
        with pytest.raises(PortTaken) as info:
            listening_socket(port, "a service", "SERVICE_PORT")
    message = str(info.value)
    assert "\n" not in message and f"port {port} for a service" in message
    assert "SERVICE_PORT" in message


def test_a_server_serves_on_the_socket_it_is_handed() -> None:
    class Hello(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"hello")

        def log_message(self, format: str, *args: object) -> None:
            pass

    sock = listening_socket(0, "a service", "SERVICE_PORT")
    server = ThreadingHTTPServer((HOST, 0), Hello, bind_and_activate=False)
    serve_on(server, sock)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert server.server_address == sock.getsockname()
        with urllib.request.urlopen(f"http://{HOST}:{sock.getsockname()[1]}/", timeout=10) as r:
            assert r.read() == b"hello"
    finally:
        server.shutdown()
        server.server_close()
    assert sock.fileno() == -1  # the server closed the socket it was handed


def _exiting_process() -> subprocess.Popen[bytes]:
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
    process.wait(timeout=30)
    return process


def test_a_process_that_exits_while_its_port_is_held_lost_the_race() -> None:
    process = _exiting_process()
    with listening_socket(0, "a service", "SERVICE_PORT") as held:
        port = held.getsockname()[1]
        with pytest.raises(PortTaken, match=f"port {port} for the service was taken"):
            wait_bound(process, port, f"http://{HOST}:{port}/", 10, "the service")


def test_a_process_that_exits_with_its_port_free_is_not_retried() -> None:
    process = _exiting_process()
    with listening_socket(0, "a service", "SERVICE_PORT") as held:
        port = held.getsockname()[1]
    with pytest.raises(LocalCloudError, match="exited during start-up") as info:
        wait_bound(process, port, f"http://{HOST}:{port}/", 10, "the service")
    assert not isinstance(info.value, PortTaken)
