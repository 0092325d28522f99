"""Per-batch result manifests, in the manner of AWS HealthImaging's import manifests.

Layout (staging bucket)::

    manifests/<batch>/success.ndjson   one line per file that reached the store
                                       (status imported | duplicate)
    manifests/<batch>/failure.ndjson   one line per file that did not
                                       (status conflict | failed, with reason)
    manifests/<batch>/summary.json     counts, the operation and its own counters,
                                       times; written last: its presence means
                                       the batch is verified

A line: ``{key, status, reason?, batch, operation, ledger, staged, source: {uri,
generation, size, md5Hash, crc32c}, study, series, sop, checksum,
storedChecksum?}``. Manifests live beside the ledger, with the same access, so
they name the source objects in full; alerts and logs never do.

The two NDJSON files are rewritten whole on a repeat (a crash before the
summary); the summary is create-if-absent, so the first complete verification
is the one on record.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import storage

from dicomflow import retry
from dicomflow.batches import create_json, read_json
from dicomflow.config import MANIFESTS_PREFIX
from dicomflow.export import iso
from dicomflow.operations import OperationView
from dicomflow.verify import SUCCESS, FileResult, counts

SCHEMA_VERSION = 1


def success_name(batch: str) -> str:
    return f"{MANIFESTS_PREFIX}{batch}/success.ndjson"


def failure_name(batch: str) -> str:
    return f"{MANIFESTS_PREFIX}{batch}/failure.ndjson"


def summary_name(batch: str) -> str:
    return f"{MANIFESTS_PREFIX}{batch}/summary.json"


def ndjson(lines: Iterable[Mapping[str, Any]]) -> str:
    """One compact JSON object per line."""
    return "".join(json.dumps(line, sort_keys=True, separators=(",", ":")) + "\n" for line in lines)


def build_summary(
    batch: str,
    record: Mapping[str, Any],
    operation: OperationView | None,
    results: list[FileResult],
    now: datetime,
) -> dict[str, Any]:
    """The ``summary.json`` of a verified batch. Pure."""
    op: dict[str, Any] | None = None
    if operation is not None:
        op = {
            "name": operation.name,
            "done": operation.done,
            "createTime": iso(operation.created) if operation.created else None,
            "endTime": iso(operation.ended) if operation.ended else None,
            "counter": dict(operation.counter),
            "error": {"code": operation.error_code} if operation.error_code is not None else None,
        }
    by_status = counts(results)
    return {
        "schemaVersion": SCHEMA_VERSION,
        "batch": batch,
        "importUri": record.get("uri"),
        "operation": op,
        "recordError": record.get("error"),
        "counts": {**by_status, "total": len(results)},
        "success": sum(by_status[s] for s in SUCCESS),
        "failure": len(results) - sum(by_status[s] for s in SUCCESS),
        "fetchedForChecksum": sum(1 for r in results if r.fetched),
        "times": {
            "sealedAt": record.get("sealedAt"),
            "requestedAt": record.get("requestedAt"),
            "startedAt": record.get("startedAt"),
            "finishedAt": record.get("finishedAt"),
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
        blob = bucket.blob(name)
        text = ndjson(lines)
        retry.call(
            lambda blob=blob, text=text: blob.upload_from_string(  # type: ignore[misc]
                text, content_type="application/x-ndjson"
            )
        )


def write_summary(bucket: storage.Bucket, summary: dict[str, Any]) -> dict[str, Any]:
    """Create the summary once; a repeat returns the one on record."""
    name = summary_name(summary["batch"])
    create_json(bucket, name, summary)
    return read_json(bucket, name) or summary


def read_summary(bucket: storage.Bucket, batch: str) -> dict[str, Any] | None:
    return read_json(bucket, summary_name(batch))


def read_lines(bucket: storage.Bucket, name: str) -> list[dict[str, Any]]:
    """The lines of an NDJSON manifest ([] when absent)."""
    blob = bucket.blob(name)
    try:
        text = retry.call(blob.download_as_text)
    except gexc.NotFound:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]
