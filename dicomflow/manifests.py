"""Per-batch result manifests, in the manner of AWS HealthImaging's import manifests.

Layout (staging bucket)::

    manifests/<batch>/success.ndjson   one line per file that reached the store
                                       (status imported | duplicate)
    manifests/<batch>/failure.ndjson   one line per file that did not
                                       (status conflict | failed, with reason)
    manifests/<batch>/summary.json     counts, the operation and its own counters,
                                       times; written last: its presence means
                                       the batch is verified

A line is the file record (``staging.FileRecord``: key, source bucket, name and
generation, size, checksums, study, series and SOP UIDs, windows) plus ``status``,
``reason``, ``batch``, ``operation``, ``staged``, ``checksum`` and
``storedChecksum`` when the store's bytes differ. Manifests live in the staging
bucket, with its access, so they name the source objects in full; alerts and logs
never do.

The two NDJSON files are rewritten whole on a repeat (a crash before the summary);
the summary is create-if-absent, so the first complete verification is the one on
record. Status views read summaries, never one object per file.
"""

from __future__ import annotations

from datetime import datetime

from google.cloud import storage

from dicomflow import objects
from dicomflow.clock import iso
from dicomflow.json_types import JSON
from dicomflow.staging import failure_name, success_name, summary_name
from dicomflow.verify import SUCCESS, FileResult, counts

SCHEMA_VERSION = 2


def build_summary(
    batch: str,
    queued: JSON,
    operation: JSON | None,
    results: list[FileResult],
    restaged: int,
    now: datetime,
) -> JSON:
    """The ``summary.json`` of a verified batch. Pure."""
    by_status = counts(results)
    success = sum(by_status[s] for s in SUCCESS)
    operation = operation or {}
    return {
        "schemaVersion": SCHEMA_VERSION,
        "batch": batch,
        "window": queued.get("window"),
        "importUri": queued.get("uri"),
        "operation": {
            "name": operation.get("operation"),
            "counter": {
                k: int(v) for k, v in (operation.get("counter") or {}).items() if str(v).isdigit()
            },
            "error": operation.get("error"),
        },
        "counts": {**by_status, "total": len(results)},
        "success": success,
        "failure": len(results) - success,
        "fetchedForChecksum": len({r.record.sop for r in results if r.fetched and r.record.sop}),
        "restaged": restaged,
        "bytes": sum(r.record.size for r in results),
        "times": {
            "sealedAt": queued.get("sealedAt"),
            "requestedAt": operation.get("requestedAt"),
            "startedAt": operation.get("startedAt"),
            "finishedAt": operation.get("finishedAt"),
            "verifiedAt": iso(now),
        },
        "manifests": {"success": success_name(batch), "failure": failure_name(batch)},
    }


def write_lists(
    bucket: storage.Bucket, batch: str, operation: str | None, results: list[FileResult]
) -> None:
    """Write ``success.ndjson`` and ``failure.ndjson`` (whole, idempotent)."""
    good = [r.line(batch, operation) for r in results if r.status in SUCCESS]
    bad = [r.line(batch, operation) for r in results if r.status not in SUCCESS]
    for name, lines in ((success_name(batch), good), (failure_name(batch), bad)):
        objects.write_text(bucket, name, objects.ndjson(lines), "application/x-ndjson")


def write_summary(bucket: storage.Bucket, summary: JSON) -> JSON:
    """Create the summary once; a repeat returns the one on record."""
    name = summary_name(summary["batch"])
    objects.create(bucket, name, summary)
    return objects.read_json(bucket, name) or summary


def read_summary(bucket: storage.Bucket, batch: str) -> JSON | None:
    return objects.read_json(bucket, summary_name(batch))


def read_lines(bucket: storage.Bucket, name: str) -> list[JSON]:
    """The lines of an NDJSON manifest ([] when absent)."""
    return objects.read_ndjson(bucket, name) or []
