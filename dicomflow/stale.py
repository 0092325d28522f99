"""Non-final states older than a bound: one ``stale_state`` alert per episode of each kind.

``report`` (the report tick) looks at unsealed windows, open batches and open exports
older than ``DICOMFLOW_STALE_STATE_MINUTES``; the subject ``stale/<kind>/<oldest id>``
makes one alert per episode.

See docs/architecture.md#stale-state
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime, timedelta

from dicomflow import alerts, batches, export, log, objects
from dicomflow.clock import iso, parse_time
from dicomflow.runtime import Context
from dicomflow.staging import (
    open_name,
    parse_batch,
    parse_window,
)

logger = logging.getLogger(__name__)

KIND = "stale_state"


def _age_minutes(since: datetime, now: datetime) -> int:
    return int((now - since).total_seconds() // 60)


def unsealed_windows(ctx: Context) -> dict[str, datetime]:
    """Window -> start of each window holding copies but not sealed, from the seal cursor
    (one read, two listings)."""
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    cursor = str((objects.read_json(bucket, batches.SEAL_CURSOR) or {}).get("window") or "")
    return {window: parse_window(window) for window in batches.unsealed(bucket, cursor)}


def open_batches(
    ctx: Context, batch_ids: Iterable[str], older_than: datetime
) -> dict[str, datetime]:
    """Batch -> when it was sealed, for each open batch sealed before ``older_than``.

    A batch is sealed after its window ends, so only batches whose window started
    before ``older_than`` can qualify; their open records (``sealedAt``) are read.
    """
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    found: dict[str, datetime] = {}
    for batch in batch_ids:
        try:
            start = parse_window(parse_batch(batch)[0])
        except ValueError:
            continue
        if start >= older_than:
            continue
        doc = objects.read_json(bucket, open_name(batch))
        if doc is None:
            continue  # verified since it was listed
        found[batch] = parse_time(doc.get("sealedAt")) or start
    return found


def open_exports(ctx: Context) -> dict[str, datetime]:
    """Date -> first claim of each export that is not final (one listing, one read each)."""
    found: dict[str, datetime] = {}
    for day in export.open_days(ctx):
        marker = export.read_marker(ctx, day)
        if marker is None or export.is_final(marker[0]):
            continue
        claimed = parse_time(marker[0].get("firstClaimedAt"))
        if claimed is not None:
            found[day.isoformat()] = claimed
    return found


def report(ctx: Context, now: datetime, open_batch_ids: Iterable[str]) -> list[str]:
    """Alert each kind of state whose oldest item is older than the bound; the subjects."""
    bound = timedelta(minutes=ctx.settings.stale_state_minutes)
    states = {
        "window": unsealed_windows(ctx),
        "batch": open_batches(ctx, open_batch_ids, now - bound),
        "export": open_exports(ctx),
    }
    subjects: list[str] = []
    for state, items in states.items():
        old = sorted((since, item) for item, since in items.items() if now - since > bound)
        if not old:
            continue
        since, oldest = old[0]
        subject = f"stale/{state}/{oldest}"
        details = {
            "state": state,
            "oldest": oldest,
            "oldestSince": iso(since),
            "oldestAgeMinutes": _age_minutes(since, now),
            "count": len(old),
            "thresholdMinutes": ctx.settings.stale_state_minutes,
        }
        alert = alerts.build_alert(
            KIND, subject, "WARNING", str(ctx.settings.dicom_store), details, now
        )
        if alerts.publish_once(ctx, alert):
            logger.warning(
                "stale state",
                extra=log.fields(
                    state=state, oldest=oldest, count=len(old), alertId=alert.alert_id
                ),
            )
        subjects.append(subject)
    return subjects
