"""Per-batch result manifests, in the manner of AWS HealthImaging's import manifests.

``write_lists`` writes ``manifests/<batch>/success.ndjson`` and ``failure.ndjson``;
``write_summary`` creates ``summary.json`` once, last (its presence means the batch is
verified); ``read_summary`` and ``read_lines`` read them back.

See docs/architecture.md#manifests
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
