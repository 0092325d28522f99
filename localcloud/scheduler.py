"""The local stand-in for Cloud Scheduler -> Pub/Sub -> Eventarc.

Two schedules: the minute tick (to ingest and report) and the export tick
(to export). Each fires every ``interval`` seconds, and ``fire()`` sends one
by hand (``python -m localcloud tick minute|export``). A tick is a
``messagePublished`` CloudEvent whose ``publishTime`` (and ``scheduledTime``
attribute) is the scheduled time, as Cloud Scheduler's would be.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from localcloud.delivery import Deliverer, pubsub_event


@dataclass(frozen=True)
class Schedule:
    """A named tick, its topic, its interval and the (function, URL) pairs it reaches."""

    name: str
    topic: str
    interval: float
    targets: tuple[tuple[str, str], ...]


def fire(deliverer: Deliverer, schedule: Schedule, now: datetime | None = None) -> None:
    """Send one tick of ``schedule`` to each of its targets."""
    moment = now or datetime.now(UTC)
    topic_id = schedule.topic.rsplit("/", 1)[-1]
    project = schedule.topic.split("/")[1]
    for function, target in schedule.targets:
        subscription = f"projects/{project}/subscriptions/{topic_id}-{function}"
        deliverer.submit(
            pubsub_event(target, schedule.topic, subscription, {"tick": schedule.name}, moment)
        )


class Scheduler:
    """Fires each schedule on its interval from one background thread."""

    def __init__(self, deliverer: Deliverer, schedules: list[Schedule]) -> None:
        self._deliverer = deliverer
        self._schedules = schedules
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        next_due = {s.name: time.monotonic() + s.interval for s in self._schedules}
        while not self._stop.is_set():
            now = time.monotonic()
            for schedule in self._schedules:
                if schedule.interval > 0 and now >= next_due[schedule.name]:
                    fire(self._deliverer, schedule)
                    next_due[schedule.name] = now + schedule.interval
            self._stop.wait(min(0.5, *(max(0.01, d - now) for d in next_due.values())))
