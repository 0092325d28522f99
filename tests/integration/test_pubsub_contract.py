"""The Pub/Sub contract dicomflow relies on, checked against the real emulator and the fallback.

Both kinds are driven through google-api-python-client, the same way the
pipeline and the local stack talk to Pub/Sub, so a behaviour the fallback gets
wrong shows up as a difference from the emulator.
"""

from __future__ import annotations

import base64
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from google.auth.credentials import AnonymousCredentials
from googleapiclient.discovery import build
from googleapiclient.errors import HttpError

from localcloud.errors import LocalCloudError
from localcloud.ports import HOST
from localcloud.pubsub import (
    PORT_SETTING,
    PubSubServer,
    emulator_missing_reason,
    find_emulator,
    start_pubsub,
)
from tests.http_recorder import Recorder
from tests.integration.sites import PubSubServers

PROJECT = "local"
KINDS = ["emulator", "fallback"]
# Short enough to keep the redelivery test quick; the emulator accepts it.
SHORT_DEADLINE = 2
REPO_ROOT = Path(__file__).resolve().parents[2]


def _skip_without_emulator(kind: str) -> None:
    reason = emulator_missing_reason() if kind == "emulator" else None
    if reason is not None:
        pytest.skip(f"Pub/Sub emulator not available: {reason}")


@pytest.fixture(scope="session", params=KINDS)
def pubsub_server(request: pytest.FixtureRequest, pubsub_servers: PubSubServers) -> PubSubServer:
    """The session's server of each kind in turn (the one the other tests use too)."""
    return pubsub_servers.get(request.param)


def client_for(url: str) -> Any:
    """A Pub/Sub v1 client for ``url``; httplib2 is not thread-safe, so one per thread."""
    return build(
        "pubsub",
        "v1",
        static_discovery=True,
        cache_discovery=False,
        client_options={"api_endpoint": url + "/"},
        credentials=AnonymousCredentials(),
    )


@pytest.fixture
def service(pubsub_server: PubSubServer) -> Iterator[Any]:
    """A Pub/Sub v1 client aimed at the server under test."""
    client = client_for(pubsub_server.url)
    yield client
    client.close()


def unique(prefix: str) -> str:
    """A resource id no other test in the session uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def topic_path(topic_id: str) -> str:
    return f"projects/{PROJECT}/topics/{topic_id}"


def sub_path(sub_id: str) -> str:
    return f"projects/{PROJECT}/subscriptions/{sub_id}"


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def make_topic(service: Any) -> str:
    name = topic_path(unique("topic"))
    service.projects().topics().create(name=name, body={}).execute()
    return name


def make_sub(service: Any, topic: str, **body: Any) -> str:
    name = sub_path(unique("sub"))
    service.projects().subscriptions().create(name=name, body={"topic": topic, **body}).execute()
    return name


def publish(service: Any, topic: str, *messages: dict[str, Any]) -> list[str]:
    result = (
        service.projects()
        .topics()
        .publish(topic=topic, body={"messages": list(messages)})
        .execute()
    )
    ids: list[str] = result["messageIds"]
    return ids


def pull_once(service: Any, sub: str, limit: int = 10) -> list[dict[str, Any]]:
    body = {"maxMessages": limit, "returnImmediately": True}
    result = service.projects().subscriptions().pull(subscription=sub, body=body).execute()
    received: list[dict[str, Any]] = result.get("receivedMessages", [])
    return received


def pull_until(service: Any, sub: str, count: int, timeout: float) -> list[dict[str, Any]]:
    """Pull until ``count`` messages arrived; fails after ``timeout`` s."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        batch = pull_once(service, sub)
        got += batch
        if not batch:
            time.sleep(0.05)
    assert len(got) >= count, f"pulled {len(got)} messages within {timeout} s, wanted {count}"
    return got


def ack(service: Any, sub: str, *ack_ids: str) -> None:
    body = {"ackIds": list(ack_ids)}
    service.projects().subscriptions().acknowledge(subscription=sub, body=body).execute()


def listening(port: int) -> bool:
    """Whether anything accepts connections on ``port``.

    Connecting, not binding, because the port stays in TIME_WAIT after a close.
    """
    with socket.socket() as probe:
        return probe.connect_ex((HOST, port)) == 0


def error_of(call: Any) -> tuple[int, str]:
    """The HTTP status and Google error status a failing call returns."""
    with pytest.raises(HttpError) as info:
        call.execute()
    error = json.loads(info.value.content)["error"]
    assert error["code"] == info.value.status_code
    assert error["message"]
    return info.value.status_code, error["status"]


# -- resources ---------------------------------------------------------------


def test_topic_and_subscription_lifecycle(service: Any) -> None:
    topics, subs = service.projects().topics(), service.projects().subscriptions()
    topic = make_topic(service)
    assert topics.get(topic=topic).execute() == {"name": topic}
    sub = make_sub(service, topic, ackDeadlineSeconds=30)
    got = subs.get(subscription=sub).execute()
    assert (got["name"], got["topic"], got["ackDeadlineSeconds"]) == (sub, topic, 30)
    assert not got["pushConfig"]
    assert subs.delete(subscription=sub).execute() == {}
    assert error_of(subs.get(subscription=sub)) == (404, "NOT_FOUND")
    assert topics.delete(topic=topic).execute() == {}
    assert error_of(topics.get(topic=topic)) == (404, "NOT_FOUND")


def test_default_ack_deadline_is_ten_seconds(service: Any) -> None:
    sub = make_sub(service, make_topic(service))
    got = service.projects().subscriptions().get(subscription=sub).execute()
    assert got["ackDeadlineSeconds"] == 10


def test_recreate_is_already_exists(service: Any) -> None:
    topic = make_topic(service)
    sub = make_sub(service, topic)
    create_topic = service.projects().topics().create(name=topic, body={})
    create_sub = service.projects().subscriptions().create(name=sub, body={"topic": topic})
    assert error_of(create_topic) == (409, "ALREADY_EXISTS")
    assert error_of(create_sub) == (409, "ALREADY_EXISTS")


def test_unknown_names_are_not_found(service: Any) -> None:
    topics, subs = service.projects().topics(), service.projects().subscriptions()
    topic, sub = topic_path(unique("missing")), sub_path(unique("missing"))
    body = {"messages": [{"data": b64(b"x")}]}
    pull = {"maxMessages": 1, "returnImmediately": True}
    for call in (
        topics.get(topic=topic),
        topics.delete(topic=topic),
        topics.publish(topic=topic, body=body),
        subs.create(name=sub, body={"topic": topic}),
        subs.get(subscription=sub),
        subs.delete(subscription=sub),
        subs.pull(subscription=sub, body=pull),
        subs.acknowledge(subscription=sub, body={"ackIds": [f"{sub}:1"]}),
    ):
        assert error_of(call) == (404, "NOT_FOUND"), call.uri


def test_invalid_requests_are_invalid_argument(service: Any) -> None:
    topics, subs = service.projects().topics(), service.projects().subscriptions()
    topic = make_topic(service)
    sub = make_sub(service, topic)
    for call in (
        topics.create(name=topic_path("1-starts-with-a-digit"), body={}),
        topics.create(name=topic_path("goog-reserved"), body={}),
        topics.publish(topic=topic, body={"messages": []}),
        topics.publish(topic=topic, body={"messages": [{"data": "not base64!"}]}),
        topics.publish(topic=topic, body={"messages": [{}]}),
        subs.create(name=sub_path(unique("sub")), body={"topic": topic, "ackDeadlineSeconds": 601}),
        subs.pull(subscription=sub, body={"maxMessages": 0, "returnImmediately": True}),
        subs.acknowledge(subscription=sub, body={"ackIds": []}),
    ):
        assert error_of(call) == (400, "INVALID_ARGUMENT"), call.uri


# -- pull delivery -------------------------------------------------------------


def test_publish_pull_ack_round_trips_data_and_attributes(service: Any) -> None:
    topic = make_topic(service)
    sub = make_sub(service, topic)
    payload = b'\x00\xff{"alert": "failed"}'
    attributes = {"type": "import.failed", "version": "1", "empty": ""}
    ids = publish(
        service, topic, {"data": b64(payload), "attributes": attributes}, {"attributes": {"a": "b"}}
    )
    assert len(set(ids)) == 2
    got = {m["message"]["messageId"]: m for m in pull_until(service, sub, 2, timeout=10)}
    assert sorted(got) == sorted(ids)
    first, second = got[ids[0]]["message"], got[ids[1]]["message"]
    assert base64.b64decode(first["data"]) == payload
    assert first["attributes"] == attributes
    assert first["publishTime"].endswith("Z")
    assert base64.b64decode(second.get("data", "")) == b""
    assert second["attributes"] == {"a": "b"}
    ack(service, sub, *(m["ackId"] for m in got.values()))
    assert pull_once(service, sub) == []


def test_unacked_message_comes_back_after_the_ack_deadline(service: Any) -> None:
    topic = make_topic(service)
    sub = make_sub(service, topic, ackDeadlineSeconds=SHORT_DEADLINE)
    kept, dropped = publish(service, topic, {"data": b64(b"acked")}, {"data": b64(b"dropped")})
    first = {m["message"]["messageId"]: m["ackId"] for m in pull_until(service, sub, 2, 10)}
    pulled_at = time.monotonic()
    ack(service, sub, first[kept])
    assert pull_once(service, sub) == [], "redelivered before the deadline"
    again = pull_until(service, sub, 1, timeout=SHORT_DEADLINE + 8)
    waited = time.monotonic() - pulled_at
    assert [m["message"]["messageId"] for m in again] == [dropped]
    assert again[0]["ackId"] != first[dropped]
    assert base64.b64decode(again[0]["message"]["data"]) == b"dropped"
    assert waited >= SHORT_DEADLINE - 0.5, f"came back after {waited:.1f} s"
    ack(service, sub, again[0]["ackId"])


def test_zero_ack_deadline_redelivers_at_once(service: Any) -> None:
    topic = make_topic(service)
    sub = make_sub(service, topic, ackDeadlineSeconds=60)
    (message_id,) = publish(service, topic, {"data": b64(b"nack me")})
    (first,) = pull_until(service, sub, 1, timeout=10)
    service.projects().subscriptions().modifyAckDeadline(
        subscription=sub, body={"ackIds": [first["ackId"]], "ackDeadlineSeconds": 0}
    ).execute()
    (again,) = pull_until(service, sub, 1, timeout=5)
    assert again["message"]["messageId"] == message_id


def test_messages_reach_only_subscriptions_that_existed_at_publish(service: Any) -> None:
    topic = make_topic(service)
    early_a, early_b = make_sub(service, topic), make_sub(service, topic)
    (before,) = publish(service, topic, {"data": b64(b"before")})
    late = make_sub(service, topic)
    (after,) = publish(service, topic, {"data": b64(b"after")})
    for sub in (early_a, early_b):
        got = pull_until(service, sub, 2, timeout=10)
        assert sorted(m["message"]["messageId"] for m in got) == sorted([before, after])
    got = pull_until(service, late, 1, timeout=10)
    time.sleep(0.3)
    got += pull_once(service, late)
    assert [m["message"]["messageId"] for m in got] == [after]


def test_a_waiting_pull_returns_when_a_message_arrives(
    service: Any, pubsub_server: PubSubServer
) -> None:
    topic = make_topic(service)
    sub = make_sub(service, topic)
    result: dict[str, Any] = {}

    def wait_pull() -> None:
        client = client_for(pubsub_server.url)
        try:
            body = {"maxMessages": 5, "returnImmediately": False}
            result.update(
                client.projects().subscriptions().pull(subscription=sub, body=body).execute()
            )
        finally:
            client.close()

    waiter = threading.Thread(target=wait_pull)
    waiter.start()
    time.sleep(0.5)  # let the pull start waiting before anything is published
    assert waiter.is_alive(), "a pull that need not return immediately returned at once"
    (message_id,) = publish(service, topic, {"data": b64(b"wake up")})
    waiter.join(timeout=8)
    assert not waiter.is_alive(), "the waiting pull did not return after a publish"
    assert [m["message"]["messageId"] for m in result["receivedMessages"]] == [message_id]


def test_concurrent_publishers_lose_nothing(service: Any, pubsub_server: PubSubServer) -> None:
    topic = make_topic(service)
    sub = make_sub(service, topic)
    published: list[str] = []
    lock = threading.Lock()

    def publisher(worker: int) -> None:
        client = client_for(pubsub_server.url)
        try:
            for n in range(20):
                ids = publish(client, topic, {"data": b64(f"{worker}-{n}".encode())})
                with lock:
                    published.extend(ids)
        finally:
            client.close()

    workers = [threading.Thread(target=publisher, args=(w,)) for w in range(6)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)
    assert len(set(published)) == 120
    got = pull_until(service, sub, 120, timeout=15)
    assert sorted(m["message"]["messageId"] for m in got) == sorted(published)
    payloads = {base64.b64decode(m["message"]["data"]).decode() for m in got}
    assert payloads == {f"{w}-{n}" for w in range(6) for n in range(20)}
    ack(service, sub, *(m["ackId"] for m in got))


# -- push delivery -------------------------------------------------------------


def test_push_delivers_the_envelope_and_a_2xx_acks(
    service: Any, recorder_factory: Callable[[list[int]], Recorder]
) -> None:
    recorder = recorder_factory([200])
    topic = make_topic(service)
    endpoint = recorder.url + "/push?token=t"
    sub = make_sub(service, topic, pushConfig={"pushEndpoint": endpoint})
    got = service.projects().subscriptions().get(subscription=sub).execute()
    assert got["pushConfig"] == {"pushEndpoint": endpoint}
    (message_id,) = publish(service, topic, {"data": b64(b"tick"), "attributes": {"k": "v"}})
    (envelope,) = recorder.wait_for(1, timeout=10)
    assert envelope["subscription"] == sub
    message = envelope["message"]
    assert message["messageId"] == message_id
    assert base64.b64decode(message["data"]) == b"tick"
    assert message["attributes"] == {"k": "v"}
    assert message["publishTime"].endswith("Z")
    path, headers, _ = recorder.requests[0]
    assert path == "/push?token=t"
    assert headers["Content-Type"].startswith("application/json")
    # Both kinds retry an unacked push within about a second; none may come.
    time.sleep(1.5)
    assert len(recorder.requests) == 1


def test_push_is_retried_after_a_500(
    service: Any, recorder_factory: Callable[[list[int]], Recorder]
) -> None:
    recorder = recorder_factory([500, 204])
    topic = make_topic(service)
    sub = make_sub(service, topic, pushConfig={"pushEndpoint": recorder.url + "/push"})
    (message_id,) = publish(service, topic, {"data": b64(b"retry me")})
    first, second = recorder.wait_for(2, timeout=10)
    assert first["message"]["messageId"] == second["message"]["messageId"] == message_id
    assert second["subscription"] == sub
    time.sleep(1.5)
    assert len(recorder.requests) == 2, "a 204 must count as an ack"


# -- start-up ------------------------------------------------------------------


def test_auto_picks_the_fallback_without_gcloud(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # PATH keeps java but loses gcloud, so only the missing SDK decides.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    java = subprocess.run(["which", "java"], capture_output=True, text=True).stdout.strip()
    if java:
        (bin_dir / "java").symlink_to(java)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert find_emulator() is None
    assert "gcloud" in (emulator_missing_reason() or "")
    server = start_pubsub(kind="auto")
    try:
        assert server.kind == "fallback"
        with urllib.request.urlopen(f"{server.url}/v1/projects/{PROJECT}/topics") as response:
            assert response.status == 200
    finally:
        server.stop()


def test_auto_picks_the_emulator_and_stop_ends_the_jvm() -> None:
    _skip_without_emulator("emulator")
    server = start_pubsub(kind="auto")
    assert server.kind == "emulator"
    assert server.process is not None
    pid = server.process.pid
    server.stop()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    assert not listening(server.port)


@pytest.mark.parametrize("kind", KINDS)
def test_a_taken_port_is_a_one_line_error(kind: str) -> None:
    _skip_without_emulator(kind)
    with socket.socket() as holder:
        holder.bind((HOST, 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(LocalCloudError) as info:
            start_pubsub(port=port, kind=kind)
    message = str(info.value)
    assert "\n" not in message
    assert str(port) in message
    assert PORT_SETTING in message


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(LocalCloudError, match="auto, emulator, fallback"):
        start_pubsub(kind="grpc")


@pytest.mark.parametrize("kind", KINDS)
def test_module_prints_ready_and_stops_on_sigterm(kind: str) -> None:
    _skip_without_emulator(kind)
    process = subprocess.Popen(
        [sys.executable, "-m", "localcloud.pubsub", "--port", "0", "--kind", kind],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        readable, _, _ = select.select([process.stdout], [], [], 60)
        assert readable, "no ready line within 60 s"
        line = process.stdout.readline().strip()
        assert line.startswith(f"ready http://{HOST}:"), line
        url = line.removeprefix("ready ")
        with urllib.request.urlopen(f"{url}/v1/projects/{PROJECT}/topics") as response:
            assert response.status == 200
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
        assert process.returncode == 0, stderr
        port = int(url.rsplit(":", 1)[1])
        assert not listening(port), "something (an orphaned JVM?) still listens"
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


# -- fallback only -------------------------------------------------------------


def test_fallback_keeps_its_state_across_a_restart(tmp_path: Path) -> None:
    server = start_pubsub(kind="fallback", data_dir=tmp_path)
    client = client_for(server.url)
    try:
        topic = make_topic(client)
        sub = make_sub(client, topic)
        (message_id,) = publish(client, topic, {"data": b64(b"survives")})
        pull_until(client, sub, 1, timeout=5)  # leased, never acked
    finally:
        client.close()
        server.stop()
    server = start_pubsub(kind="fallback", data_dir=tmp_path)
    client = client_for(server.url)
    try:
        assert error_of(client.projects().topics().create(name=topic, body={}))[0] == 409
        (again,) = pull_until(client, sub, 1, timeout=5)
        assert again["message"]["messageId"] == message_id
        ack(client, sub, again["ackId"])
        (next_id,) = publish(client, topic, {"data": b64(b"new")})
        assert next_id != message_id
    finally:
        client.close()
        server.stop()
