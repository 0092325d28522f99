"""Calls to the DICOM store through the Cloud Healthcare API: start an import, read an
operation, delete a study.

Both go through ``retry.call``: 5xx and timeouts are retried with backoff
until a short deadline, then surface as ``TransientError``. A 429 on import
is the service's cap on running operations; it surfaces at once as
``QuotaExceeded`` so that the tick leaves the batch queued for the next
tick. Other HTTP errors surface as ``PermanentError``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from googleapiclient.errors import HttpError

from dicomflow import retry
from dicomflow.errors import PermanentError
from dicomflow.json_types import JSON
from dicomflow.names import DicomStoreName
from dicomflow.runtime import Context

if TYPE_CHECKING:
    from googleapiclient.http import HttpRequest  # slow to import; requests come built


class QuotaExceeded(Exception):
    """The service refused a new operation with 429 (its concurrency quota)."""


def _not_quota(exc: BaseException) -> bool:
    """Transient, except 429: retrying within the call cannot free a running operation."""
    return retry.should_retry(exc) and retry.status_of(exc) != 429


def _execute(
    request: HttpRequest,
    deadline: float,
    predicate: Callable[[BaseException], bool] = retry.should_retry,
) -> JSON:
    try:
        result: JSON = retry.call(
            lambda: request.execute(num_retries=0), deadline=deadline, predicate=predicate
        )
    except HttpError as exc:
        if exc.status_code == 429:
            raise QuotaExceeded(f"Healthcare API 429: {exc.reason}") from exc
        raise PermanentError(f"Healthcare API {exc.status_code}: {exc.reason}") from exc
    return result


def start_import(
    ctx: Context, uri: str, deadline: float = 10.0, store: DicomStoreName | None = None
) -> JSON:
    """Start ``dicomStores.import`` of ``uri`` into ``store`` (default: the configured store);
    return the Operation.

    Raises:
        QuotaExceeded: the service answered 429 (too many operations running).
        TransientError: 5xx or timeouts until the deadline.
        PermanentError: the request was refused for good (400, 403, 404...).
    """
    stores = ctx.healthcare().projects().locations().datasets().dicomStores()
    request = stores.import_(
        name=str(store or ctx.settings.dicom_store),
        body={
            "gcsSource": {"uri": uri},
            "blobStorageSettings": {"blobStorageClass": "STANDARD"},
        },
    )
    return _execute(request, deadline, _not_quota)


def get_operation(ctx: Context, name: str, deadline: float = 10.0) -> JSON:
    """``operations.get``: the Operation named ``name``.

    Raises:
        TransientError: 429, 5xx or timeouts until the deadline.
        PermanentError: the operation cannot be read (e.g. 404).
    """
    request = ctx.healthcare().projects().locations().datasets().operations().get(name=name)
    return _execute(request, deadline)


def delete_study(ctx: Context, store: DicomStoreName, study: str, deadline: float = 10.0) -> JSON:
    """Start ``studies.delete`` of ``study`` in ``store``; return the Operation.

    Raises:
        QuotaExceeded, TransientError, PermanentError: as ``start_import``; a study the
            store does not hold is a ``PermanentError`` caused by a 404.
    """
    studies = ctx.healthcare().projects().locations().datasets().dicomStores().studies()
    request = studies.delete(parent=str(store), dicomWebPath=f"studies/{study}")
    return _execute(request, deadline)


def get_store(ctx: Context, store: DicomStoreName, deadline: float = 10.0) -> JSON:
    """``dicomStores.get``: the store resource (a ``PermanentError`` caused by a 404 when
    the store does not exist)."""
    request = ctx.healthcare().projects().locations().datasets().dicomStores().get(name=str(store))
    return _execute(request, deadline)


def is_not_found(exc: BaseException) -> bool:
    """True for a ``PermanentError`` raised by a 404 answer."""
    cause = exc.__cause__
    return isinstance(cause, HttpError) and retry.status_of(cause) == 404
