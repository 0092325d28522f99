"""Services started on a port that another process took first: a new port, or a clear error."""

from __future__ import annotations

import socket
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


def test_the_measured_stack_starts_again_when_a_port_it_picked_is_taken(
    tmp_path: Path, taken_port: int, picks_taken_first: Callable[[], list[int]]
) -> None:
    measured = MeasuredStack.start(tmp_path)
    try:
        assert picks_taken_first()[0] == taken_port
        assert measured.stack.urls["storage"] != f"http://{HOST}:{taken_port}"
        assert measured.storage_proxy.upstream_url == measured.stack.urls["storage"]
        listed = requests.get(
            f"{measured.storage_proxy.url}/storage/v1/b?project=local", timeout=10
        )
        assert listed.status_code == 200
    finally:
        measured.stop()
