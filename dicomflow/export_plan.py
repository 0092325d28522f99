"""What one export holds: the counts it should write, and for incremental exports which
verified batches, read from their manifests, and the filter file that names them.

``plan`` fills the marker's ``expected`` counts and ``scan``; ``select_batches`` (pure)
chooses the batches an incremental export takes.

See docs/architecture.md#what-an-incremental-export-holds
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from google.cloud import storage

from dicomflow import batches, manifests, objects, retry
from dicomflow.backup import (
    Counts,
    expected_counts,
    is_image_mime,
    qido_fields,
    resource_path,
    tag_value,
)
from dicomflow.clock import iso, parse_time
from dicomflow.config import MANIFESTS_PREFIX, STATE_PREFIX
from dicomflow.json_types import JSON
from dicomflow.pool import pmap
from dicomflow.runtime import Context
from dicomflow.staging import parse_batch, success_name, window_id
from dicomflow.verify import SUCCESS

# Longer than a report tick can run (the function timeout, 540 s) plus clock skew: a batch
# verified (``verifiedAt``, the report tick's start) gets its summary within this time.
MANIFEST_MARGIN = timedelta(seconds=1200)
SUMMARY_FILE = "summary.json"
QIDO_PAGE = 1000

Uids = tuple[str, str, str]


@dataclass(frozen=True)
class VerifiedBatch:
    """A batch whose ``manifests/<batch>/summary.json`` exists (it is verified).

    ``verified``: the summary's ``times.verifiedAt``; ``success``: its count of
    imported and duplicate files (None when the summary has no count).
    """

    batch: str
    verified: datetime
    success: int | None = None


def select_batches(
    verified: Iterable[VerifiedBatch],
    since: datetime | None,
    until: datetime,
    exported: Collection[str] = (),
    margin: timedelta = MANIFEST_MARGIN,
) -> list[VerifiedBatch]:
    """The verified batches an incremental export ending at ``until`` must hold, by id.

    A batch is chosen when it was verified at or before ``until`` and after
    ``since - margin`` (``since``: the previous complete export's tick; None: no
    previous export, every batch up to ``until``), unless that export already held
    it (``exported``: its ``scan.recent``). Pure.
    """
    low = None if since is None else since - margin
    return sorted(
        (
            b
            for b in verified
            if b.verified <= until and (low is None or b.verified > low) and b.batch not in exported
        ),
        key=lambda b: b.batch,
    )


def recent_batches(
    chosen: Iterable[VerifiedBatch], until: datetime, margin: timedelta = MANIFEST_MARGIN
) -> list[str]:
    """Chosen batches verified within ``margin`` of ``until``: the next export skips them."""
    return sorted(b.batch for b in chosen if b.verified > until - margin)


def scan_floor(
    verified: Iterable[VerifiedBatch],
    pending: Iterable[str],
    now: datetime,
    until: datetime,
    window_seconds: int,
    margin: timedelta = MANIFEST_MARGIN,
) -> str:
    """Where the next export may start listing ``manifests/`` (``scan.nextFrom``). Pure.

    The lowest of: ``pending`` (batches and windows not verified yet, read before
    the manifests), the batches verified within ``margin`` of ``until`` or after it,
    and the window of ``now - margin``.
    """
    floor = window_id(now - margin, window_seconds)
    late = (b.batch for b in verified if b.verified > until - margin)
    return min([floor, *pending, *late])


def success_paths(lines: Iterable[JSON]) -> list[Uids]:
    """UIDs (study, series, sop) of ``success.ndjson`` lines, deduplicated and sorted."""
    found: dict[Uids, None] = {}
    for line in lines:
        uids = (line.get("study"), line.get("series"), line.get("sop"))
        if line.get("status") not in SUCCESS or not all(uids):
            continue
        found[(str(uids[0]), str(uids[1]), str(uids[2]))] = None
    return sorted(found)


def _is_batch(text: str) -> bool:
    try:
        parse_batch(text)
    except ValueError:
        return False
    return True


def pending_batches(staging: storage.Bucket) -> list[str]:
    """Ids at or below every batch not verified yet: the open batches and the seal cursor.

    A batch is open from its seal until its summary exists; a window not sealed yet
    is at or above the seal cursor (``batches.seal_due`` moves it only past sealed
    windows). Two requests, however long the history.
    """
    cursor = (objects.read_json(staging, batches.SEAL_CURSOR) or {}).get("window")
    found = [b for b in batches.open_batches(staging) if _is_batch(b)]
    return [*found, *([str(cursor)] if cursor and _is_batch(str(cursor)) else [])]


def verified_batches(staging: storage.Bucket, start: str | None) -> list[VerifiedBatch]:
    """Every batch with a ``summary.json`` whose id is ``start`` or later: one GET per batch."""
    offset = f"{MANIFESTS_PREFIX}{start}" if start else None
    created: dict[str, datetime | None] = {}
    for blob in objects.blobs(staging, MANIFESTS_PREFIX, offset):
        batch, _, leaf = blob.name[len(MANIFESTS_PREFIX) :].partition("/")
        if leaf == SUMMARY_FILE and _is_batch(batch):
            created[batch] = blob.time_created

    def read(batch: str) -> VerifiedBatch | None:
        summary = manifests.read_summary(staging, batch)
        if summary is None:
            return None
        # An unreadable stamp is not expected: the object's creation time is close.
        when = parse_time((summary.get("times") or {}).get("verifiedAt")) or created[batch]
        if when is None:
            return None
        count = summary.get("success")
        return VerifiedBatch(batch, when, int(count) if isinstance(count, int) else None)

    return [v for v in pmap(read, sorted(created)) if v is not None]


def settled_since(
    staging: storage.Bucket,
    previous: JSON | None,
    doc: JSON,
    now: datetime,
    window_seconds: int,
) -> list[Uids]:
    """The instances of batches verified since ``previous`` (the last complete export's
    marker), up to ``doc``'s tick. Records ``since`` and ``scan`` on ``doc``."""
    since = parse_time(previous.get("tickTime")) if previous else None
    until = parse_time(doc["tickTime"])
    if until is None:
        raise ValueError(f"export marker has no readable tickTime: {doc.get('tickTime')!r}")
    before = (previous or {}).get("scan") or {}
    start = before.get("nextFrom")  # None: no earlier scan, list manifests/ from its start
    exported = frozenset(before.get("recent") or ())
    pending = pending_batches(staging)  # before the manifests: see scan_floor
    verified = verified_batches(staging, start)
    chosen = select_batches(verified, since, until, exported)
    wanted = [b.batch for b in chosen if b.success != 0]
    lines = pmap(lambda batch: manifests.read_lines(staging, success_name(batch)), wanted)
    doc["since"] = iso(since) if since else None
    doc["scan"] = {
        "from": start,
        "summaries": len(verified),
        "batches": len(chosen),
        "recent": recent_batches(chosen, until),
        "nextFrom": scan_floor(verified, pending, now, until, window_seconds),
    }
    return success_paths(itertools.chain.from_iterable(lines))


def paths_file_name(day: date, attempt: int) -> str:
    """The ``filterConfig.resourcePathsGcsUri`` file of an incremental export."""
    return f"{STATE_PREFIX}exports/{day.isoformat()}.{attempt}.paths.txt"


def qido_instances(ctx: Context, fields: list[str], study: str | None = None) -> list[JSON]:
    """Every instance of the store (or of ``study``) as QIDO JSON, paged."""
    client = ctx.dicomweb()
    found: list[JSON] = []
    offset = 0
    while True:
        page: list[JSON] = retry.call(
            lambda start=offset: client.search_for_instances(  # type: ignore[misc]
                study_instance_uid=study, fields=fields, limit=QIDO_PAGE, offset=start
            ),
        )
        found.extend(page)
        if len(page) < QIDO_PAGE:
            return found
        offset += len(page)


@dataclass(frozen=True)
class Plan:
    """What to export: ``paths_uri`` (the filter file; None: the whole store), or
    nothing at all (``empty``: an incremental export with nothing settled)."""

    paths_uri: str | None
    empty: bool = False


def plan(ctx: Context, day: date, doc: JSON, previous: JSON | None) -> Plan:
    """Fill ``doc``'s ``expected`` and ``scan``; write the filter file of an incremental
    export. ``previous``: the last complete export's marker (incremental only)."""
    settings = ctx.settings
    mime_type = doc["mimeType"]
    fields = qido_fields(mime_type)
    staging = ctx.storage.bucket(settings.staging_bucket)
    now = ctx.clock()
    if doc["mode"] == "full":
        tick = parse_time(doc["tickTime"]) or now
        pending = pending_batches(staging)  # before counting: see scan_floor
        doc["expected"] = expected_counts(qido_instances(ctx, fields), mime_type).as_dict()
        # What was verified before now is in the store, so in this backup.
        window = settings.batch_window_seconds
        doc["scan"] = {"recent": [], "nextFrom": scan_floor([], pending, now, tick, window)}
        return Plan(None)
    uids = settled_since(staging, previous, doc, now, settings.batch_window_seconds)
    if not uids:
        doc["expected"] = {"instances": 0, "objects": 0}
        return Plan(None, empty=True)
    counts = Counts(len(uids), len(uids))
    if is_image_mime(mime_type):
        wanted = set(uids)
        listed: list[JSON] = []
        for study in sorted({s for s, _, _ in uids}):
            listed.extend(
                i
                for i in qido_instances(ctx, fields, study=study)
                if (study, tag_value(i, "0020000E"), tag_value(i, "00080018")) in wanted
            )
        counts = expected_counts(listed, mime_type)
    doc["expected"] = counts.as_dict()
    name = paths_file_name(day, int(doc["attempt"]))
    objects.write_text(staging, name, "".join(resource_path(*u) + "\n" for u in uids), "text/plain")
    doc["resourcePathsGcsUri"] = f"gs://{settings.staging_bucket}/{name}"
    return Plan(doc["resourcePathsGcsUri"])
