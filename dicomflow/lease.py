"""Leases on small Cloud Storage marker objects: create-if-absent, then compare-and-swap.

A lease is a JSON object holding ``state`` and ``leaseUntil``. A caller owns it by
creating it with ``if_generation_match=0``, or, once ``leaseUntil`` has passed, by
overwriting it with ``if_generation_match=<the generation it read>``. Whoever loses
either race sees ``PreconditionFailed`` and reads the marker again. Used by
``alerts.publish_once`` (one publisher per alert).
"""

from __future__ import annotations

import contextlib
import json
import logging
from datetime import UTC, datetime
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import storage

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
