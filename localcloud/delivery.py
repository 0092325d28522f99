"""At-least-once HTTP delivery of binary-mode CloudEvents, as Eventarc does.

``Deliverer`` POSTs each event from a pool of worker threads until the target answers
2xx, with capped exponential backoff, and keeps an event it gives up on after
``max_age`` as a dead letter (``count_dead_letters``). ``storage_event`` and
``pubsub_event`` build the events; header values are percent-encoded
(``encode_header_value``).

See docs/architecture.md#event-delivery
"""

from __future__ import annotations

import base64
import json
import logging
import queue
import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

from dicomflow import log

logger = logging.getLogger(__name__)

STORAGE_FINALIZED = "google.cloud.storage.object.v1.finalized"
PUBSUB_PUBLISHED = "google.cloud.pubsub.topic.v1.messagePublished"


@dataclass
class Event:
    """One CloudEvent to deliver to one target URL."""

    target: str
    headers: dict[str, str]
    body: bytes
    first_try: float = field(default_factory=time.monotonic)
    attempts: int = 0
    settled: bool = False


def encode_header_value(value: str) -> str:
    """Percent-encode ``value`` for a ``ce-`` header (CloudEvents HTTP binding, 3.1.3.2).

    Space, double-quote, percent and every character outside printable ASCII
    (U+0021-U+007E) become the percent-escapes of their UTF-8 bytes.
    """
    return "".join(
        char if "!" <= char <= "~" and char not in _ESCAPED else _escape(char) for char in value
    )


_ESCAPED = frozenset('"%')


def _escape(char: str) -> str:
    return "".join(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))


def binary_headers(attributes: dict[str, str]) -> dict[str, str]:
    """The HTTP headers of a binary-mode CloudEvent: ``ce-<name>``, values percent-encoded."""
    return {f"ce-{name}": encode_header_value(value) for name, value in attributes.items()}


def count_dead_letters(path: Path) -> int:
    """How many events were dead-lettered into ``path`` (0 when it does not exist)."""
    try:
        with path.open("rb") as lines:
            return sum(1 for line in lines if line.strip())
    except FileNotFoundError:
        return 0


def pubsub_dead_letters(pubsub_url: str, topic: str) -> Callable[[dict[str, Any]], None]:
    """A sink for ``Deliverer(on_dead_letter=...)`` that publishes each dead letter to
    ``topic`` (``projects/P/topics/T``), as an Eventarc trigger's dead-letter topic keeps
    it. The record is the message data; its attributes carry only the event's id."""

    def publish(record: dict[str, Any]) -> None:
        data = base64.b64encode(json.dumps(record, ensure_ascii=False).encode()).decode()
        attributes = {"ceId": str(record["headers"].get("ce-id", ""))}
        response = requests.post(
            f"{pubsub_url.rstrip('/')}/v1/{topic}:publish",
            json={"messages": [{"data": data, "attributes": attributes}]},
            timeout=30,
        )
        response.raise_for_status()

    return publish


def rfc3339(moment: datetime) -> str:
    """``2026-11-25T12:53:00.123456Z``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def storage_event(target: str, resource: dict[str, Any]) -> Event:
    """A ``storage.object.v1.finalized`` event for an object resource (JSON API form).

    The ce-id is stable per object generation, so a redelivery carries the same id.
    """
    data = dict(resource)
    for key in ("generation", "metageneration", "size"):
        if key in data:
            data[key] = str(data[key])
    bucket, name = data["bucket"], data["name"]
    event_id = uuid.uuid5(uuid.NAMESPACE_URL, f"gs://{bucket}/{name}#{data.get('generation')}")
    headers = binary_headers(
        {
            "specversion": "1.0",
            "type": STORAGE_FINALIZED,
            "source": f"//storage.googleapis.com/projects/_/buckets/{bucket}",
            "subject": f"objects/{name}",
            "id": str(event_id.int % 10**16),
            "time": data.get("updated") or rfc3339(datetime.now(UTC)),
        }
    )
    headers["Content-Type"] = "application/json"
    return Event(target, headers, json.dumps(data).encode())


def pubsub_event(
    target: str, topic: str, subscription: str, payload: dict[str, Any], publish_time: datetime
) -> Event:
    """A ``pubsub.topic.v1.messagePublished`` event, as Cloud Scheduler -> Pub/Sub -> Eventarc."""
    message_id = str(uuid.uuid4().int % 10**16)
    published = rfc3339(publish_time)
    data = {
        "subscription": subscription,
        "message": {
            "data": base64.b64encode(json.dumps(payload).encode()).decode(),
            "attributes": {"scheduledTime": published},
            "messageId": message_id,
            "publishTime": published,
        },
    }
    project, _, topic_id = topic.removeprefix("projects/").partition("/topics/")
    headers = binary_headers(
        {
            "specversion": "1.0",
            "type": PUBSUB_PUBLISHED,
            "source": f"//pubsub.googleapis.com/projects/{project}/topics/{topic_id}",
            "id": message_id,
            "time": published,
        }
    )
    headers["Content-Type"] = "application/json"
    return Event(target, headers, json.dumps(data).encode())


class Deliverer:
    """Delivers events with retries from a pool of worker threads."""

    def __init__(
        self,
        workers: int = 8,
        timeout: float = 600.0,
        max_age: float = 24 * 3600.0,
        max_backoff: float = 30.0,
        dead_letter: Path | None = None,
        min_backoff: float = 0.2,
        jitter: float = 0.0,
        routes: Mapping[str, Sequence[str]] | None = None,
        on_dead_letter: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        if not 0.0 <= jitter <= 1.0:
            raise ValueError(f"jitter={jitter}: a fraction, 0 to 1")
        self._queue: queue.Queue[Event | None] = queue.Queue()
        self._timeout = timeout
        self._max_age = max_age
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._jitter = jitter
        self._random = random.Random()
        self._routes = {target: tuple(urls) for target, urls in (routes or {}).items() if urls}
        self._in_flight: dict[str, int] = {}
        # Seconds each attempt took, by target URL: what Cloud Run bills an instance for.
        self.attempt_seconds: dict[str, list[float]] = {}
        self._dead_letter = dead_letter
        self._on_dead_letter = on_dead_letter
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._retry_timers: set[threading.Timer] = set()
        self.delivered = 0
        self.failed_attempts = 0
        self.dead = 0
        self._pending = 0
        self._idle = threading.Condition(self._lock)
        self._threads = [
            threading.Thread(target=self._work, name=f"deliver-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, event: Event) -> None:
        """Queue ``event`` for delivery."""
        with self._lock:
            self._pending += 1
        self._queue.put(event)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is queued or in flight; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def stop(self) -> None:
        """Stop the workers; events still queued are abandoned with a warning."""
        self._stop.set()
        with self._lock:
            for timer in self._retry_timers:
                timer.cancel()
            pending = self._pending
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=5)
        if pending:
            logger.warning("stopped with events undelivered", extra=log.fields(pending=pending))

    def _done(self, event: Event) -> None:
        with self._idle:
            # Once per event, even when a worker error settles it a second time.
            if event.settled:
                return
            event.settled = True
            self._pending -= 1
            if not self._pending:
                self._idle.notify_all()

    def alive_workers(self) -> int:
        """How many worker threads are running (all of them until ``stop``)."""
        return sum(thread.is_alive() for thread in self._threads)

    def _work(self) -> None:
        session = requests.Session()
        while True:
            event = self._queue.get()
            if event is None or self._stop.is_set():
                session.close()
                return
            try:
                self._attempt(session, event)
            except Exception as exc:
                # Only a bug gets this far (_attempt handles the send's errors). The worker
                # must outlive it: it is logged and counts as a failed attempt, so the event
                # is retried until its age runs out and then kept as a dead letter.
                self._unexpected(event, exc)

    def _unexpected(self, event: Event, exc: Exception) -> None:
        kind = type(exc).__name__
        logger.error(
            "delivery worker error %s; counted as a failed attempt",
            kind,
            extra=log.fields(ceId=event.headers.get("ce-id"), target=event.target),
        )
        try:
            self._retry(event, kind)
        except Exception:
            self._give_up(event, f"worker error {kind}", log.fields())

    def backoff(self, attempt: int) -> float:
        """The pause before retrying after failed attempt number ``attempt`` (1-based)."""
        delay: float = min(self._max_backoff, self._min_backoff * 2.0 ** (attempt - 1))
        return delay * (1.0 - self._jitter * self._random.random())

    def _instance(self, target: str) -> str:
        """The URL this attempt goes to: ``target``, or its least busy instance."""
        urls = self._routes.get(target)
        if not urls:
            return target
        with self._lock:
            url = min(urls, key=lambda u: self._in_flight.get(u, 0))
            self._in_flight[url] = self._in_flight.get(url, 0) + 1
        return url

    def _release(self, url: str) -> None:
        with self._lock:
            if url in self._in_flight:
                self._in_flight[url] -= 1

    def _attempt(self, session: requests.Session, event: Event) -> None:
        event.attempts += 1
        url = self._instance(event.target)
        began = time.monotonic()
        try:
            response = session.post(
                url, data=event.body, headers=event.headers, timeout=self._timeout
            )
            status: int | str = response.status_code
            ok = 200 <= response.status_code < 300
        except Exception as exc:
            # Not only requests' errors: a header the HTTP client cannot encode raises
            # UnicodeEncodeError, for one. Each is a failed attempt, retried like a 5xx.
            # Its text may quote a header (an object name), so only its type is logged.
            status, ok = type(exc).__name__, False
        finally:
            self._release(url)
            with self._lock:
                self.attempt_seconds.setdefault(event.target, []).append(time.monotonic() - began)
        if ok:
            with self._lock:
                self.delivered += 1
            self._done(event)
        else:
            self._retry(event, status)

    def _retry(self, event: Event, status: int | str) -> None:
        with self._lock:
            self.failed_attempts += 1
        age = time.monotonic() - event.first_try
        fields = log.fields(
            ceId=event.headers.get("ce-id"),
            target=event.target,
            status=status,
            attempt=event.attempts,
        )
        if age > self._max_age or self._stop.is_set():
            why = (
                "delivery stopped"
                if self._stop.is_set()
                else f"no success in {self._max_age:.0f} s"
            )
            self._give_up(event, why, fields)
            return
        delay = self.backoff(event.attempts)
        logger.warning("delivery failed; retrying in %.1f s", delay, extra=fields)
        timer = threading.Timer(delay, self._requeue, args=(event,))
        timer.daemon = True
        with self._lock:
            self._retry_timers.add(timer)
        timer.start()

    def _give_up(self, event: Event, why: str, fields: dict[str, Any]) -> None:
        """Keep ``event`` as a dead letter; never raises, so no worker dies of it."""
        try:
            with self._lock:
                if event.settled:
                    return
                self.dead += 1
            logger.error("event dead-lettered: %s", why, extra=fields)
            record = {"headers": event.headers, "body": event.body.decode("utf-8", "replace")}
            if self._dead_letter is not None:
                line = json.dumps(record, ensure_ascii=False) + "\n"
                with self._lock, self._dead_letter.open("a", encoding="utf-8") as out:
                    out.write(line)
            if self._on_dead_letter is not None:
                self._on_dead_letter(record)
        except Exception as exc:
            logger.error("dead letter not written", extra=log.fields(errorType=type(exc).__name__))
        finally:
            self._done(event)

    def _requeue(self, event: Event) -> None:
        with self._lock:
            self._retry_timers.discard(threading.current_thread())
        self._queue.put(event)
