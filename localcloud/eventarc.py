"""The local stand-in for an Eventarc Cloud Storage trigger.

fake-gcs-server can publish notifications only over gRPC Pub/Sub, which the
built-in Pub/Sub fallback does not speak. So the same mechanism serves both
cases: ``BucketWatcher`` lists the landing bucket every ``interval`` seconds
(0.2 s by default) and turns each new (name, generation) into a
``google.cloud.storage.object.v1.finalized`` CloudEvent for the ``Deliverer``.
The pause between listings grows with the time a listing takes, so a big
bucket does not keep a core busy.

What it sees is saved to ``seen_file`` after each round, so a restart resumes
where it stopped: uploads made while it was down are delivered on start, and
nothing already delivered is sent again (except the at-least-once repeats
that Eventarc may also make).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

from google.cloud import storage

from dicomflow import log
from localcloud.delivery import Deliverer, storage_event

logger = logging.getLogger(__name__)


class BucketWatcher:
    """Polls one bucket and submits a finalize event per new object generation."""

    def __init__(
        self,
        client: storage.Client,
        bucket: str,
        target: str,
        deliverer: Deliverer,
        interval: float = 0.2,
        seen_file: Path | None = None,
    ) -> None:
        self._client = client
        self._bucket = bucket
        self._target = target
        self._deliverer = deliverer
        self._interval = interval
        self._seen_file = seen_file
        self._seen: dict[str, int] = {}
        if seen_file is not None and seen_file.exists():
            self._seen = {k: int(v) for k, v in json.loads(seen_file.read_text()).items()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watch-{bucket}", daemon=True)
        self.events = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def poll_once(self) -> int:
        """List the bucket once and submit events for what is new; returns how many."""
        found: dict[str, int] = {}
        new = 0
        for blob in self._client.list_blobs(self._bucket):
            generation = int(blob.generation or 0)
            found[blob.name] = generation
            if self._seen.get(blob.name) != generation:
                resource = dict(blob._properties)
                resource.setdefault("bucket", self._bucket)
                self._deliverer.submit(storage_event(self._target, resource))
                new += 1
        # Deleted objects drop out, so a re-upload under the same name is new again.
        self._seen = found
        if new and self._seen_file is not None:
            tmp = self._seen_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(found))
            tmp.replace(self._seen_file)
        self.events += new
        return new

    def _run(self) -> None:
        pause = self._interval
        while not self._stop.wait(pause):
            started = time.monotonic()
            try:
                self.poll_once()
            except Exception as exc:  # keep watching: storage may be restarting
                logger.warning("listing %s failed: %s", self._bucket, exc, extra=log.fields())
            # A big bucket takes a while to list; pausing twice as long as the listing
            # took keeps the watcher to a third of a core while events still arrive
            # within about a second (listing 5,000 objects takes about 0.25 s here).
            pause = max(self._interval, 2 * (time.monotonic() - started))
