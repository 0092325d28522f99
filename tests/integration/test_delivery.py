"""Event delivery: the Eventarc stand-in and the scheduler, against a recording HTTP target."""

from __future__ import annotations

import base64
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import functions_framework
import pytest
from cloudevents.http import from_http
from werkzeug.serving import make_server

from dicomflow.events import decode_attributes
from localcloud import __main__ as localcloud_cli
from localcloud.delivery import Deliverer, Event, count_dead_letters, pubsub_event, storage_event
from localcloud.errors import LocalCloudError
from localcloud.eventarc import BucketWatcher
from localcloud.scheduler import Schedule, fire
from localcloud.stack import StackConfig
from localcloud.storage import StorageServer


class Recorder:
    """An HTTP target that records requests and fails the first ``fail_first`` of them."""

    def __init__(self, fail_first: int = 0, status: int = 503, delay: float = 0.0) -> None:
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
                time.sleep(delay)
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


# Names imaging folders and users really produce, and every character that a header, a URL
# or a percent-decoder could get wrong.
NASTY_NAMES = [
    "edge/ünïcødé 名前.dcm",
    "latin/café résumé.dcm",
    "latin/Ångström ÿ ß.dcm",
    "cjk/患者/画像 001.dcm",
    "cjk/환자 영상.dcm",
    "cjk/カルテ.dcm",
    "emoji/🩻 scan.dcm",
    "emoji/😀😀 👩‍⚕️.dcm",
    "space/a b  c .dcm",
    "hash/#1#.dcm",
    "query/what?now=1&x=2.dcm",
    "percent/100%.dcm",
    "percent/%41%2F%zz%.dcm",
    "plus/a+b+c.dcm",
    'quote/say "hi".dcm',
    "mixed/é 名 😀 # ? % +.dcm",
    "cyrillic/пациент.dcm",
    "arabic/مريض.dcm",
    "greek/ασθενής.dcm",
    "combining/e\u0301 vs \u00e9.dcm",
]
TARGET_SOURCE = str(Path(__file__).resolve().parent / "functions" / "delivery_target.py")


@pytest.fixture
def function_target() -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """functions-framework serving delivery_target.record on a free loopback port."""
    app = functions_framework.create_app("record", TARGET_SOURCE, "cloudevent")
    received: list[tuple[str, str]] = sys.modules["delivery_target"].received
    received.clear()
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.port}/", received
    finally:
        server.shutdown()
        thread.join(timeout=5)


def test_any_object_name_reaches_the_function_and_no_worker_dies(
    function_target: tuple[str, list[tuple[str, str]]], tmp_path: Path
) -> None:
    """20 nasty names are delivered and decode to the exact name; events whose raw headers
    no HTTP client can send (more of them than there are workers) are dead-lettered."""
    url, received = function_target
    assert len(NASTY_NAMES) == 20
    dead = tmp_path / "dead.ndjson"
    deliverer = Deliverer(workers=8, max_age=1.0, max_backoff=0.1, dead_letter=dead)
    unsendable = 9
    try:
        for generation, name in enumerate(NASTY_NAMES, 1):
            deliverer.submit(
                storage_event(url, {"bucket": "land", "name": name, "generation": generation})
            )
        for i in range(unsendable):
            good = storage_event(url, {"bucket": "land", "name": f"raw/{i}", "generation": 1})
            # A header value sent without percent-encoding: the HTTP client raises.
            raw = {**good.headers, "ce-subject": f"objects/raw/名前 {i}"}
            deliverer.submit(Event(url, raw, good.body))
        assert deliverer.wait_idle(120)
        assert deliverer.alive_workers() == 8
    finally:
        deliverer.stop()
    assert deliverer.delivered == len(NASTY_NAMES)
    assert deliverer.dead == unsendable
    assert count_dead_letters(dead) == unsendable
    assert sorted(received) == sorted((f"objects/{name}", name) for name in NASTY_NAMES)


def test_dead_letters_show_in_localcloud_status(
    recorder: Recorder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    os.environ["LOCALCLOUD_HOME"] = str(home)
    config = StackConfig.from_env()
    # what a running stack writes; the recorder stands in for its services
    state = {"pid": os.getpid(), "pubsubKind": "fallback", "urls": {"ingest": recorder.url}}
    (home / "state.json").write_text(json.dumps({**state, "home": str(home)}))

    assert localcloud_cli.main(["status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["deadLetters"] == 0

    recorder.fail_first, recorder.status = 10**6, 500
    deliverer = Deliverer(
        workers=2, max_age=0.3, max_backoff=0.05, dead_letter=config.dead_letter_path
    )
    try:
        for i in range(3):
            deliverer.submit(
                storage_event(recorder.url, {"bucket": "b", "name": f"lost/{i}", "generation": 1})
            )
        assert deliverer.wait_idle(30)
    finally:
        deliverer.stop()

    assert localcloud_cli.main(["status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["deadLetters"] == 3
    assert localcloud_cli.main(["status"]) == 0
    text = capsys.readouterr().out
    assert "dead letters: 3" in text
    assert "lost/" not in text  # the count only, never the names


def test_an_unexpected_error_counts_as_a_failed_attempt_and_no_worker_dies(
    recorder: Recorder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug outside the send (here: the first two attempts of every event raise) is logged
    and retried like a 5xx; each event is then delivered, and all 8 workers live."""
    dead = tmp_path / "dead.ndjson"
    deliverer = Deliverer(workers=8, max_age=30.0, max_backoff=0.05, dead_letter=dead)
    attempt = Deliverer._attempt

    def flaky(self: Deliverer, session: Any, event: Event) -> None:
        if event.attempts < 2:
            event.attempts += 1
            raise KeyError("a bug")
        attempt(self, session, event)

    monkeypatch.setattr(Deliverer, "_attempt", flaky)
    try:
        for generation in range(1, 21):
            deliverer.submit(
                storage_event(
                    recorder.url, {"bucket": "b", "name": "x.dcm", "generation": generation}
                )
            )
        assert deliverer.wait_idle(60)
        assert deliverer.alive_workers() == 8
    finally:
        deliverer.stop()
    assert deliverer.delivered == 20 and deliverer.dead == 0
    assert deliverer.failed_attempts == 40
    assert len(recorder.requests) == 20 and count_dead_letters(dead) == 0


def test_backoff_follows_the_schedule_with_jitter_below_it() -> None:
    """Eventarc's schedule: from the first delay, doubling, capped; jitter only shortens."""
    exact = Deliverer(workers=1, min_backoff=10.0, max_backoff=600.0)
    jittered = Deliverer(workers=1, min_backoff=10.0, max_backoff=600.0, jitter=0.5)
    try:
        assert [exact.backoff(n) for n in (1, 2, 3, 7, 20)] == [10.0, 20.0, 40.0, 600.0, 600.0]
        for attempt in range(1, 12):
            delays = {jittered.backoff(attempt) for _ in range(50)}
            assert all(0.5 * exact.backoff(attempt) <= d <= exact.backoff(attempt) for d in delays)
            assert len(delays) > 1
    finally:
        exact.stop()
        jittered.stop()
    with pytest.raises(ValueError, match="jitter"):
        Deliverer(workers=1, jitter=1.5)


def test_routes_spread_events_over_the_instances_behind_one_url() -> None:
    """N instances behind one target: each attempt goes to the least busy one."""
    first, second = Recorder(delay=0.2), Recorder(delay=0.2)
    target = "http://127.0.0.1:9/ingest"  # never contacted: a route name
    deliverer = Deliverer(workers=4, routes={target: [first.url, second.url]})
    try:
        for i in range(8):
            deliverer.submit(
                storage_event(target, {"bucket": "bkt", "name": f"{i}.dcm", "generation": 1})
            )
        assert deliverer.wait_idle(20)
    finally:
        deliverer.stop()
        first.close()
        second.close()
    assert deliverer.delivered == 8 and deliverer.failed_attempts == 0
    assert len(first.requests) + len(second.requests) == 8
    assert len(first.requests) >= 2 and len(second.requests) >= 2
    assert len(deliverer.attempt_seconds[target]) == 8
    assert min(deliverer.attempt_seconds[target]) >= 0.2


def test_ingest_workers_setting() -> None:
    assert StackConfig.from_env({}).ingest_workers == 1
    assert StackConfig.from_env({"LOCALCLOUD_INGEST_WORKERS": "4"}).ingest_workers == 4
    for bad in ("0", "x", "17", "-1"):
        with pytest.raises(LocalCloudError, match="LOCALCLOUD_INGEST_WORKERS"):
            StackConfig.from_env({"LOCALCLOUD_INGEST_WORKERS": bad})
