"""Leases on small Cloud Storage marker objects: create-if-absent, then compare-and-swap.

A lease is a JSON object holding ``state`` and ``leaseUntil``. A caller owns it by
creating it with ``if_generation_match=0``, or, once ``leaseUntil`` has passed, by
overwriting it with ``if_generation_match=<the generation it read>``. Whoever loses
either race sees ``PreconditionFailed`` and reads the marker again. Used by
``alerts.publish_once`` (one publisher per alert) and the report's per-batch
verification lease (one verifier per finished batch).

A holder that works longer than it can promise up front keeps a short lease live with
``Renewal``: a thread rewrites ``leaseUntil`` (compare-and-swap on the generation) at a
third of the lease's length. A killed holder stops renewing, so others wait at most one
lease length, not the longest the work could take.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import storage

from dicomflow import log

EXPIRED = datetime.min.replace(tzinfo=UTC)
logger = logging.getLogger(__name__)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


class Lease:
    """The marker object and what we know of it."""

    def __init__(self, blob: storage.Blob) -> None:
        self.blob = blob
        self.state: str | None = None
        self.lease_until: datetime | None = None
        self.generation: int | None = None

    def load(self) -> bool:
        """Read the marker; False when it does not exist."""
        # A fresh Blob each time: one that knows a generation downloads that old version.
        self.blob = self.blob.bucket.blob(self.blob.name)
        try:
            raw = self.blob.download_as_bytes()
        except gexc.NotFound:
            return False
        self.generation = self.blob.generation
        try:
            doc = json.loads(raw)
            self.state = str(doc.get("state"))
            self.lease_until = datetime.fromisoformat(str(doc.get("leaseUntil")))
        except (ValueError, TypeError, AttributeError):
            # An unreadable marker is treated as an expired claim.
            self.state, self.lease_until = None, EXPIRED
        return True


def write(blob: storage.Blob, doc: dict[str, Any], generation: int) -> int:
    """Write ``doc`` if the object is at ``generation`` (0: absent); the new generation."""
    blob.upload_from_string(
        json.dumps(doc, sort_keys=True),
        content_type="application/json",
        if_generation_match=generation,
    )
    return int(blob.generation or 0)


def try_acquire(lease: Lease, doc: dict[str, Any], now: datetime) -> int | None:
    """Own the lease without waiting: create it, or take over an expired one.

    ``doc`` must hold ``leaseUntil``. Returns the generation written, or None while
    another holder's lease is live.
    """
    while True:
        if not lease.load():
            try:
                return write(lease.blob, doc, 0)
            except gexc.PreconditionFailed:
                continue  # someone created it between our read and write: look again
        assert lease.lease_until is not None and lease.generation is not None
        if lease.lease_until > now:
            return None
        try:
            return write(lease.blob, doc, lease.generation)
        except gexc.PreconditionFailed:
            continue


def release(lease: Lease, generation: int) -> None:
    """Delete the marker if it is still the one we wrote (a taker-over keeps theirs)."""
    blob = lease.blob.bucket.blob(lease.blob.name)
    with contextlib.suppress(gexc.NotFound, gexc.PreconditionFailed):
        blob.delete(if_generation_match=generation)


class Renewal:
    """Keep a held lease live while the holder works (a context manager).

    Every ``seconds / 3`` (wall time) the marker is rewritten as ``doc`` with
    ``leaseUntil = clock() + seconds``, if it is still at the generation we last wrote.
    A failed renewal is tried again at the next turn; a marker that changed under us
    (``PreconditionFailed``: it expired and was taken over) stops the renewals and sets
    ``lost``. The work itself must be safe to repeat, as it is for every lease here.
    ``release()`` deletes the marker at the generation last written.
    """

    def __init__(
        self,
        lease: Lease,
        generation: int,
        doc: dict[str, Any],
        seconds: float,
        clock: Callable[[], datetime],
    ) -> None:
        self.lease = lease
        self.generation = generation
        self.lost = False
        self._doc = dict(doc)
        self._seconds = seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-renewal", daemon=True)

    def __enter__(self) -> Renewal:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def renew(self) -> None:
        """Push ``leaseUntil`` one lease length past now (the thread's turn, or a caller's)."""
        with self._lock:
            if self.lost:
                return
            doc = {**self._doc, "leaseUntil": iso(self._clock() + timedelta(seconds=self._seconds))}
            blob = self.lease.blob.bucket.blob(self.lease.blob.name)
            try:
                self.generation = write(blob, doc, self.generation)
            except gexc.PreconditionFailed:
                self.lost = True
                logger.warning("lease lost", extra=log.fields(lease=self.lease.blob.name))

    def release(self) -> None:
        self.stop()
        with self._lock:
            if not self.lost:
                release(self.lease, self.generation)

    def _run(self) -> None:
        while not self._stop.wait(self._seconds / 3):
            try:
                self.renew()
            except Exception as exc:  # transient: the lease still has time, try next turn
                logger.warning(
                    "lease renewal failed",
                    extra=log.fields(lease=self.lease.blob.name, error=type(exc).__name__),
                )
            if self.lost:
                return
