"""Which errors are worth retrying, and the one retry layer that retries them.

As in python-storage, the rule is one predicate, ``should_retry(exc)``: 429,
5xx, timeouts and dropped connections from Cloud Storage, the Google APIs or
DICOMweb are transient; everything else (400, 403, 404, 412, ...) is not, and
``is_permanent(exc)`` names the 4xx answers that a later attempt meets again.

Each call is retried in one place, never twice:

- Cloud Storage calls pass ``retry=storage()``, an api_core ``Retry`` on this
  predicate with jittered exponential backoff; the client library runs it.
- Healthcare API (googleapiclient, ``execute(num_retries=0)``) and DICOMweb
  (requests) calls, which have no such hook, go through ``call(fn)``, the same
  loop in plain Python. (Pub/Sub requests use googleapiclient's ``num_retries``.)

Both give up at their deadline (30 s unless the caller says otherwise) with
``TransientError``, whose message names no object. Which writes may be retried:
see docs/architecture.md#retries.
"""

from __future__ import annotations

import functools
import http.client
import random
import socket
import time
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import requests
from google.api_core import exceptions as api_exceptions
from google.api_core import retry as api_retry
from google.auth import exceptions as auth_exceptions
from google.cloud.storage.exceptions import InvalidResponse
from googleapiclient.errors import HttpError

from dicomflow.errors import TransientError

T = TypeVar("T")
P = ParamSpec("P")

# Seconds: how long one call is retried (and, for Storage, each request's timeout); the
# first backoff delay and the most any delay grows to.
DEADLINE = 30.0
INITIAL = 0.2
MAXIMUM = 5.0

_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})

_TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    api_exceptions.TooManyRequests,
    api_exceptions.InternalServerError,
    api_exceptions.BadGateway,
    api_exceptions.ServiceUnavailable,
    api_exceptions.GatewayTimeout,
    api_exceptions.ServerError,
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    http.client.BadStatusLine,
    http.client.IncompleteRead,
    http.client.ResponseNotReady,
    auth_exceptions.TransportError,
    ConnectionError,
    TimeoutError,
    socket.timeout,
    TransientError,
)


def status_of(exc: BaseException) -> int | None:
    """The HTTP status carried by ``exc``, if any: an API error's, or the response's of a
    DICOMweb (requests) error or of a Cloud Storage media transfer."""
    if isinstance(exc, HttpError):
        return int(exc.status_code) if exc.status_code is not None else None
    if isinstance(exc, api_exceptions.GoogleAPICallError):
        return int(exc.code) if exc.code is not None else None
    if isinstance(exc, requests.HTTPError | InvalidResponse):
        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", None)
        return int(status) if status is not None else None
    return None


def should_retry(exc: BaseException) -> bool:
    """True for 429, 5xx, timeouts and connection errors: a later attempt may succeed."""
    status = status_of(exc)
    if status is not None:
        return status in _TRANSIENT_STATUS or status >= 500
    return isinstance(exc, _TRANSIENT_TYPES)


def is_permanent(exc: BaseException) -> bool:
    """True for a 4xx answer other than 408 and 429: the same request will fail again.

    412 (a precondition) and 404 are answers the callers act on, not failures; they
    are permanent too, and callers catch them before asking.
    """
    status = status_of(exc)
    return status is not None and is_permanent_status(status)


def is_permanent_status(status: int) -> bool:
    """True for 4xx other than 408 and 429 (see ``is_permanent``)."""
    return 400 <= status < 500 and status not in _TRANSIENT_STATUS


def gave_up(deadline: float, exc: BaseException | None) -> TransientError:
    """The error for a call still failing with ``exc`` at ``deadline``: its type and HTTP
    status only, since messages of storage errors quote request URLs, which hold object
    names (and object names can hold patient names)."""
    status = status_of(exc) if exc is not None else None
    what = type(exc).__name__ if exc is not None else "no answer"
    what += f" (HTTP {status})" if status is not None else ""
    return TransientError(f"gave up after {deadline:.0f}s: {what}")


class StorageRetry(api_retry.Retry):
    """api_core's ``Retry``, raising ``gave_up(...)`` (a ``TransientError``) instead of
    ``RetryError`` once the deadline has passed; ``with_timeout`` and the like keep the
    class."""

    def __call__(
        self, func: Callable[P, T], on_error: Callable[[Exception], object] | None = None
    ) -> Callable[P, T]:
        retried = super().__call__(func, on_error)

        @functools.wraps(func)
        def wrapped(*args: P.args, **kwargs: P.kwargs) -> T:
            try:
                return retried(*args, **kwargs)
            except api_exceptions.RetryError as exc:
                raise gave_up(self.timeout or 0.0, exc.cause) from exc.cause

        return wrapped


def _release(exc: Exception) -> None:
    """Close the response of a failed media transfer before the next attempt:
    python-storage leaves a streamed download's answer open, and its connection with it."""
    if isinstance(exc, InvalidResponse):
        response = getattr(exc, "response", None)
        if isinstance(response, requests.Response):
            response.close()


def storage(deadline: float = DEADLINE) -> StorageRetry:
    """The retry to pass as ``retry=`` to every Cloud Storage call: ``should_retry`` with
    jittered exponential backoff, giving up with ``TransientError`` after ``deadline``
    seconds. Only for reads and for writes that are safe to repeat (module docstring)."""
    return StorageRetry(
        predicate=should_retry,
        initial=INITIAL,
        maximum=MAXIMUM,
        multiplier=2.0,
        timeout=deadline,
        on_error=_release,
    )


def call(
    fn: Callable[[], T],
    *,
    deadline: float = DEADLINE,
    initial: float = INITIAL,
    maximum: float = MAXIMUM,
    predicate: Callable[[BaseException], bool] = should_retry,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run ``fn``, retrying transient errors with jittered backoff until ``deadline`` seconds.

    Raises:
        TransientError: the last transient error, once the deadline has passed.
        Exception: any non-transient error of ``fn``, unchanged.
    """
    stop = time.monotonic() + deadline
    delay = initial
    while True:
        try:
            return fn()
        except Exception as exc:
            if not predicate(exc):
                raise
            if time.monotonic() + delay > stop:
                raise gave_up(deadline, exc) from exc
            sleep(delay * random.uniform(0.5, 1.0))
            delay = min(maximum, delay * 2)
