"""Event delivery: the Eventarc stand-in and the scheduler, against a recording HTTP target."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from cloudevents.http import from_http

from dicomflow.events import decode_attributes
from localcloud.delivery import Deliverer, pubsub_event, storage_event
from localcloud.eventarc import BucketWatcher
from localcloud.scheduler import Schedule, fire
from localcloud.storage import StorageServer


class Recorder:
    """An HTTP target that records requests and fails the first ``fail_first`` of them."""

    def __init__(self, fail_first: int = 0, status: int = 503) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.fail_first = fail_first
        self.status = status
        self.seen = 0
        lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            disable_nagle_algorithm = True

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with lock:
                    recorder.seen += 1
                    fail = recorder.seen <= recorder.fail_first
                    if not fail:
                        recorder.requests.append((dict(self.headers.items()), body))
                self.send_response(recorder.status if fail else 204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    rec = Recorder()
    yield rec
    rec.close()


def test_storage_event_is_a_binary_cloudevent_like_eventarc() -> None:
    resource = {
        "bucket": "land-x",
        "name": "a b/ü.dcm",
        "generation": 17,
        "size": 10,
        "updated": "t",
    }
    event = storage_event("http://x/", resource)
    # on the wire the subject is percent-encoded; the function side decodes it
    assert event.headers["ce-subject"] == "objects/a%20b/%C3%BC.dcm"
    parsed = decode_attributes(from_http(event.headers, event.body))
    assert parsed["type"] == "google.cloud.storage.object.v1.finalized"
    assert parsed["source"] == "//storage.googleapis.com/projects/_/buckets/land-x"
    assert parsed["subject"] == "objects/a b/ü.dcm"
    assert parsed.data["generation"] == "17" and parsed.data["size"] == "10"
    # the same generation gives the same id; a new generation a new one
    assert storage_event("http://x/", resource).headers["ce-id"] == event.headers["ce-id"]
    assert (
        storage_event("http://x/", {**resource, "generation": 18}).headers["ce-id"]
        != event.headers["ce-id"]
    )


def test_pubsub_tick_carries_the_scheduled_time() -> None:
    from datetime import UTC, datetime

    moment = datetime(2026, 11, 25, 23, 59, 59, tzinfo=UTC)
    event = pubsub_event(
        "http://x/", "projects/p/topics/t", "projects/p/subscriptions/s", {"tick": "export"}, moment
    )
    parsed = from_http(event.headers, event.body)
    assert parsed["type"] == "google.cloud.pubsub.topic.v1.messagePublished"
    message = parsed.data["message"]
    assert message["publishTime"] == "2026-11-25T23:59:59.000000Z"
    assert json.loads(base64.b64decode(message["data"])) == {"tick": "export"}


def test_deliverer_retries_5xx_until_delivered() -> None:
    rec = Recorder(fail_first=3)
    deliverer = Deliverer(workers=2, max_backoff=0.2)
    try:
        deliverer.submit(
            storage_event(rec.url, {"bucket": "bkt", "name": "x.dcm", "generation": 1})
        )
        assert deliverer.wait_idle(10)
    finally:
        deliverer.stop()
        rec.close()
    assert rec.seen == 4
    assert len(rec.requests) == 1
    assert deliverer.failed_attempts == 3 and deliverer.delivered == 1 and deliverer.dead == 0


def test_deliverer_dead_letters_instead_of_dropping(tmp_path: Any) -> None:
    rec = Recorder(fail_first=10**6, status=500)
    dead = tmp_path / "dead.ndjson"
    deliverer = Deliverer(workers=1, max_age=0.5, max_backoff=0.1, dead_letter=dead)
    try:
        deliverer.submit(
            storage_event(rec.url, {"bucket": "bkt", "name": "y.dcm", "generation": 2})
        )
        assert deliverer.wait_idle(10)
    finally:
        deliverer.stop()
        rec.close()
    assert deliverer.dead == 1
    assert "y.dcm" in dead.read_text()


def test_watcher_delivers_new_and_overwritten_objects(
    gcs_server: StorageServer, recorder: Recorder
) -> None:
    client = gcs_server.client()
    bucket = client.create_bucket(f"watch-{time.monotonic_ns()}")
    bucket.blob("before.dcm").upload_from_string(b"x")
    deliverer = Deliverer(workers=4)
    watcher = BucketWatcher(client, bucket.name, recorder.url, deliverer, interval=0.05)
    try:
        assert watcher.poll_once() == 1  # what was there before start is delivered too
        watcher.start()
        for i in range(20):
            bucket.blob(f"dir/{i}.dcm").upload_from_string(b"d" * i)
        bucket.blob("before.dcm").upload_from_string(b"overwritten")
        deadline = time.monotonic() + 10
        while len(recorder.requests) < 22 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        watcher.stop()
        deliverer.stop()
    events = [from_http(h, b) for h, b in recorder.requests]
    names = sorted(e.data["name"] for e in events)
    # the first upload and its overwrite are two generations, so two events
    assert names.count("before.dcm") == 2
    assert {f"dir/{i}.dcm" for i in range(20)} <= set(names)
    assert len(events) == 22


def test_schedule_fires_one_tick_per_target(recorder: Recorder) -> None:
    deliverer = Deliverer(workers=1)
    schedule = Schedule(
        "minute", "projects/p/topics/tick", 0, (("ingest", recorder.url), ("report", recorder.url))
    )
    try:
        fire(deliverer, schedule)
        assert deliverer.wait_idle(10)
    finally:
        deliverer.stop()
    subs = sorted(from_http(h, b).data["subscription"] for h, b in recorder.requests)
    assert subs == ["projects/p/subscriptions/tick-ingest", "projects/p/subscriptions/tick-report"]
