"""The dataset's long-running operations, as the report tick sees them.

``list_operations`` reads every page of ``operations.list`` for the store's
dataset (with backoff) and keeps the DICOM imports and exports; server-side
filtering is thin, so nothing is filtered on the server. ``OperationView`` is
the pure, typed reading of one Operation resource.

Our operations. When dicomflow starts an import or an export it creates
``state/ops/<id>.json``; the report reads that marker for a failed operation it
did not expect, so an operation started outside dicomflow is told apart without
listing history. Operation ids are unique within a dataset, and the store's
dataset is fixed by the settings, so the id alone names the marker.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from dicomflow import objects, retry
from dicomflow.clock import parse_time
from dicomflow.config import STATE_PREFIX
from dicomflow.json_types import JSON
from dicomflow.runtime import Context

OURS_PREFIX = f"{STATE_PREFIX}ops/"
PAGE_SIZE = 1000
IMPORT = "import"
EXPORT = "export"
_METHODS = {"ImportDicomData": IMPORT, "ExportDicomData": EXPORT}
# Cancelled: the caller asked for it, so it is not a failure to page anyone about.
CANCELLED_CODE = 1
_GS_URI = re.compile(r"gs://[^\s'\"),;]+")


@dataclass(frozen=True)
class OperationView:
    """What the report needs from one Operation resource."""

    name: str
    kind: str
    done: bool
    created: datetime | None
    ended: datetime | None
    error_code: int | None
    error_message: str
    counter: dict[str, int]
    cancel_requested: bool

    @property
    def op_id(self) -> str:
        return self.name.rsplit("/", 1)[-1]

    @property
    def failed(self) -> bool:
        """Finished with an error that nobody asked for (cancellations excluded)."""
        if not self.done or self.error_code is None:
            return False
        return not (self.error_code == CANCELLED_CODE and self.cancel_requested)

    def running_seconds(self, now: datetime) -> float | None:
        """How long an unfinished operation has been running at ``now``."""
        if self.done or self.created is None:
            return None
        return (now - self.created).total_seconds()


def _time(value: object) -> datetime | None:
    if not value:
        return None
    return parse_time(str(value))


def kind_of(operation: JSON) -> str | None:
    """``import``, ``export``, or None for any other operation (dataset creation...)."""
    method = str((operation.get("metadata") or {}).get("apiMethodName") or "")
    return _METHODS.get(method.rsplit(".", 1)[-1])


def view(operation: JSON) -> OperationView:
    """Read an Operation resource; counters travel as strings and may be missing."""
    meta = operation.get("metadata") or {}
    error = operation.get("error") if isinstance(operation.get("error"), dict) else None
    counter: dict[str, int] = {}
    for key, raw in (meta.get("counter") or {}).items():
        try:
            counter[str(key)] = int(raw)
        except (TypeError, ValueError):
            continue
    code: int | None = None
    if error is not None:
        try:
            code = int(error.get("code", 2))
        except (TypeError, ValueError):
            code = 2
    return OperationView(
        name=str(operation.get("name", "")),
        kind=kind_of(operation) or "other",
        done=bool(operation.get("done")),
        created=_time(meta.get("createTime")),
        ended=_time(meta.get("endTime")),
        error_code=code,
        error_message=str(error.get("message", "")) if error else "",
        counter=counter,
        cancel_requested=bool(meta.get("cancelRequested")),
    )


def redact(text: str, label: Callable[[str], object]) -> str:
    """``text`` with every ``gs://`` URI replaced by ``label(uri)``, cut to 300 characters.

    Error messages can name objects, and object names can name patients.
    """
    return _GS_URI.sub(lambda m: str(label(m.group(0))), text)[:300]


def list_operations(ctx: Context) -> list[OperationView]:
    """Every import and export operation of the store's dataset, all pages, with backoff."""
    dataset = str(ctx.settings.dicom_store.dataset)
    found: list[OperationView] = []
    token: str | None = None
    while True:

        def page(token: str | None = token) -> JSON:
            request = (
                ctx.healthcare()
                .projects()
                .locations()
                .datasets()
                .operations()
                .list(name=dataset, pageSize=PAGE_SIZE, pageToken=token)
            )
            result: JSON = request.execute(num_retries=0)
            return result

        body = retry.call(page)
        for operation in body.get("operations") or []:
            if kind_of(operation) is not None:
                found.append(view(operation))
        token = body.get("nextPageToken") or None
        if token is None:
            return found


def ours_name(operation: str) -> str:
    return f"{OURS_PREFIX}{operation.rsplit('/', 1)[-1]}.json"


def record_ours(ctx: Context, operation: str, kind: str, subject: str) -> None:
    """Record that dicomflow started ``operation`` (create-if-absent), for the report to
    tell its own operations from those started outside dicomflow."""
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    objects.create(
        bucket, ours_name(operation), {"operation": operation, "kind": kind, "subject": subject}
    )


def is_ours(ctx: Context, operation: str) -> bool:
    """Whether dicomflow started ``operation`` (one read of its marker)."""
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    return objects.exists(bucket, ours_name(operation))
