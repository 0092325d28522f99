"""Services started on a port that another process took first: a new port, or a clear error."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from localcloud import ports
from localcloud.errors import LocalCloudError
from localcloud.harness import MeasuredStack
from localcloud.ports import HOST
from localcloud.pubsub import emulator_missing_reason, start_pubsub
from localcloud.storage import start_storage

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port held by a listening socket for the test."""
    with socket.socket() as holder:
        holder.bind((HOST, 0))
        holder.listen()
        yield int(holder.getsockname()[1])


@pytest.fixture
def picks_taken_first(monkeypatch: pytest.MonkeyPatch, taken_port: int) -> Callable[[], list[int]]:
    """Make the port picker answer ``taken_port`` first, as if it was taken after the pick.

    Returns a function giving the ports picked so far.
    """
    picked: list[int] = []
    real = ports.free_port

    def pick() -> int:
        picked.append(taken_port if not picked else real())
        return picked[-1]

    monkeypatch.setattr(ports, "free_port", pick)
    return lambda: picked


def test_storage_starts_when_the_port_picked_for_fake_gcs_server_is_taken(
    taken_port: int, picks_taken_first: Callable[[], list[int]]
) -> None:
    server = start_storage(buckets=("ports-test",))
    try:
        assert picks_taken_first()[0] == taken_port
        assert server.upstream_port == picks_taken_first()[-1] != taken_port
        server.client().bucket("ports-test").blob("x").upload_from_string(b"1")
        assert server.client().bucket("ports-test").blob("x").download_as_bytes() == b"1"
    finally:
        server.stop()


def test_a_taken_storage_port_is_a_one_line_error(taken_port: int) -> None:
    with pytest.raises(LocalCloudError) as info:
        start_storage(port=taken_port)
    message = str(info.value)
    assert "\n" not in message
    assert str(taken_port) in message and "LOCALCLOUD_STORAGE_PORT" in message


@pytest.mark.skipif(emulator_missing_reason() is not None, reason="no Pub/Sub emulator here")
def test_the_pubsub_emulator_starts_when_its_picked_port_is_taken(
    taken_port: int, picks_taken_first: Callable[[], list[int]]
) -> None:
    server = start_pubsub(kind="emulator")
    try:
        assert picks_taken_first()[0] == taken_port
        assert server.port == picks_taken_first()[-1] != taken_port
        api = f"{server.url}/v1/projects/local/topics/ports-topic"

        assert requests.put(api, json={}, timeout=10).status_code == 200
    finally:
        server.stop()


def _bind_fails(port: int) -> bool:
    """True when another socket cannot bind ``port`` on loopback (someone holds it)."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            other.bind((HOST, port))
        except OSError:
            return True
        return False


def test_the_healthcare_emulator_serves_on_a_socket_its_starter_bound() -> None:
    listener = ports.listening_socket(0, "the emulator", "LOCALCLOUD_HEALTHCARE_PORT")
    port = listener.getsockname()[1]
    with listener:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "localcloud.healthcare"),
                *("--fd", str(listener.fileno()), "--import-workers", "0"),
            ],
            stdout=subprocess.PIPE,
            cwd=ROOT,
            pass_fds=(listener.fileno(),),
        )
    try:
        # From the bind on, no other process could take the port, nor can it now.
        assert _bind_fails(port)
        assert process.stdout is not None
        assert process.stdout.readline().decode().strip() == f"ready http://{HOST}:{port}"
        with urllib.request.urlopen(f"http://{HOST}:{port}/v1/projects/p/locations/l/datasets"):
            pass
    finally:
        process.terminate()
        process.wait(timeout=30)
        assert process.stdout is not None
        process.stdout.close()


def test_the_measured_stack_holds_every_service_port_from_start_to_stop(
    tmp_path: Path, taken_port: int, picks_taken_first: Callable[[], list[int]]
) -> None:
    """fake-gcs-server, which binds the port it is given, gets the taken port first and
    starts again on a new one; the storage front, the Healthcare emulator and every
    function instance serve on sockets the stack bound, and keep them across a crash."""
    measured = MeasuredStack.start(tmp_path, ingest_workers=2)
    stack = measured.stack
    try:
        assert picks_taken_first()[0] == taken_port
        assert stack.urls["storage"] != f"http://{HOST}:{taken_port}"
        assert measured.storage_proxy.upstream_url == stack.urls["storage"]
        assert measured.healthcare_proxy.upstream_url == stack.urls["healthcare"]
        listed = requests.get(
            f"{measured.storage_proxy.url}/storage/v1/b?project=local", timeout=10
        )
        assert listed.status_code == 200
        served = ("storage", "healthcare", "ingest", "ingest-2", "report", "export")
        held = {name: int(stack.urls[name].rstrip("/").rsplit(":", 1)[1]) for name in served}
        assert all(_bind_fails(port) for port in held.values())
        for name in ("ingest-2",):
            os.killpg(stack.process_ids(name)[0], signal.SIGKILL)
            deadline = time.monotonic() + 30
            while stack.process_ids(name) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not stack.process_ids(name)
            assert _bind_fails(held[name])  # while its process is dead
            assert stack.ensure_running(name)  # started again, and answering
            assert stack.urls[name].rstrip("/").endswith(f":{held[name]}")
    finally:
        measured.stop()
    assert not any(_bind_fails(port) for port in held.values())
