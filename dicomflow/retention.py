"""Landing retention: delete uploads some days after their file was verified in the store.

``run`` (the sweep's daily pass) deletes, at the recorded generation, the landing object
of every ``imported`` or ``duplicate`` file of batches verified
``DICOMFLOW_LANDING_DELETE_AFTER_DAYS`` days ago, walking batches from a cursor.

See docs/architecture.md#landing-retention
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from google.cloud import storage

from dicomflow import log, manifests, objects
from dicomflow.clock import parse_time
from dicomflow.config import DAY_SECONDS, MANIFESTS_PREFIX, STATE_PREFIX
from dicomflow.json_types import JSON
from dicomflow.pool import pmap
from dicomflow.runtime import Context
from dicomflow.staging import parse_batch, parse_window, success_name
from dicomflow.verify import SUCCESS

logger = logging.getLogger(__name__)

CURSOR_NAME = f"{STATE_PREFIX}retention/cursor.json"


def due(summary: JSON | None, now: datetime, days: int) -> bool:
    """True when the batch of ``summary`` was verified ``days`` or more ago."""
    if summary is None:
        return False
    verified = parse_time((summary.get("times") or {}).get("verifiedAt"))
    return verified is not None and verified + timedelta(seconds=days * DAY_SECONDS) <= now


def run(ctx: Context, now: datetime) -> dict[str, int]:
    """One pass over the batches after the cursor; counts of what it did.

    Raises:
        TransientError: Cloud Storage kept failing; the next pass repeats the work
            (a delete already done is a 404, which is fine).
    """
    settings = ctx.settings
    bucket = ctx.storage.bucket(settings.staging_bucket)
    found = objects.read(bucket, CURSOR_NAME)
    cursor, generation = found if found is not None else ({}, 0)
    after = str(cursor.get("after") or "")
    done = set(cursor.get("done") or [])
    start = f"{MANIFESTS_PREFIX}{after}/" if after else None
    days = settings.landing_delete_after_days
    batches = [
        b for b in objects.folders(bucket, MANIFESTS_PREFIX, start) if b > after and b not in done
    ]
    # A batch is verified after its window starts: a younger window cannot be due yet.
    latest = now - timedelta(seconds=days * DAY_SECONDS)
    old = [b for b in batches if parse_window(parse_batch(b)[0]) <= latest]
    summaries = pmap(lambda b: manifests.read_summary(bucket, b), old)
    ready = [b for b, s in zip(old, summaries, strict=True) if due(s, now, days)]
    deleted = sum(pmap(lambda b: _delete_uploads(ctx, b), ready))
    done.update(ready)
    waiting = [b for b in batches if b not in done]
    if waiting:
        after = max([after, *(b for b in done if b < waiting[0])])
    elif done:
        after = max(done)
    cursor = {"after": after, "done": sorted(b for b in done if b > after)}
    if ready:
        objects.swap(bucket, CURSOR_NAME, cursor, generation)
    counts = {"batches": len(ready), "deleted": deleted, "waiting": len(waiting)}
    logger.info("landing retention", extra=log.fields(**counts))
    return counts


def _delete_uploads(ctx: Context, batch: str) -> int:
    """Delete the uploads of ``batch``'s imported and duplicate files; how many went."""
    settings = ctx.settings
    staging = ctx.storage.bucket(settings.staging_bucket)
    landing = ctx.storage.bucket(settings.landing_bucket)
    lines = [
        line
        for line in manifests.read_lines(staging, success_name(batch))
        if line.get("status") in SUCCESS
        and line.get("bucket") == settings.landing_bucket
        and str(line.get("generation", "")).isdigit()
    ]
    return sum(pmap(lambda line: _delete(landing, line), lines))


def _delete(landing: storage.Bucket, line: JSON) -> int:
    """Delete this generation of the upload only (a new upload under the name stays);
    1 when this call deleted it."""
    return int(objects.delete(landing, line["name"], int(line["generation"])))
