"""Calls to the Cloud Healthcare API that ingest makes: start an import, read an operation.

Both go through ``retry.call`` with ``retry.should_retry``: 429, 5xx and
timeouts are retried with backoff until a short deadline, then surface as
``TransientError`` (the caller decides: the tick leaves the batch queued).
Other HTTP errors surface as ``PermanentError``.
"""

from __future__ import annotations

from typing import Any

from googleapiclient.errors import HttpError

from dicomflow import retry
from dicomflow.errors import PermanentError
from dicomflow.runtime import Context


class QuotaExceeded(Exception):
    """The service refused a new operation with 429 (its concurrency quota)."""


def _execute(request: Any, deadline: float) -> dict[str, Any]:
    try:
        result: dict[str, Any] = retry.call(
            lambda: request.execute(num_retries=0), deadline=deadline
        )
    except HttpError as exc:
        raise PermanentError(f"Healthcare API {exc.status_code}: {exc.reason}") from exc
    return result


def start_import(ctx: Context, uri: str, deadline: float = 10.0) -> dict[str, Any]:
    """Start ``dicomStores.import`` of ``uri`` into the configured store; return the Operation.

    Raises:
        QuotaExceeded: the service still answered 429 at the deadline.
        TransientError: other transient failures at the deadline.
        PermanentError: the request was refused for good (400, 403, 404...).
    """
    stores = ctx.healthcare().projects().locations().datasets().dicomStores()
    request = stores.import_(
        name=str(ctx.settings.dicom_store),
        body={
            "gcsSource": {"uri": uri},
            "blobStorageSettings": {"blobStorageClass": "STANDARD"},
        },
    )
    try:
        return _execute(request, deadline)
    except Exception as exc:
        cause = exc.__cause__
        if cause is not None and retry.status_of(cause) == 429:
            raise QuotaExceeded(str(cause)) from exc
        raise


def get_operation(ctx: Context, name: str, deadline: float = 10.0) -> dict[str, Any]:
    """``operations.get``: the Operation named ``name``."""
    request = ctx.healthcare().projects().locations().datasets().operations().get(name=name)
    return _execute(request, deadline)
