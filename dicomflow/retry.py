"""Which errors are worth retrying, and the backoff loop that retries them.

As in python-storage, the rule is one predicate, ``should_retry(exc)``: 429,
5xx, timeouts and dropped connections from Cloud Storage or the Healthcare
API are transient; everything else (400, 403, 404, 412, ...) is not, and
``is_permanent(exc)`` names the 4xx answers that a later attempt meets again.
``call(fn)`` retries ``fn`` on transient errors with jittered exponential
backoff until a deadline, then raises ``TransientError`` so that the caller
(or the platform, on a function) can retry later. That error's message names
the last error's type and HTTP status only, never its text (storage errors quote
request URLs, which hold object names); the original stays its ``__cause__``.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable
from typing import TypeVar

import requests
from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions
from googleapiclient.errors import HttpError

from dicomflow.errors import TransientError

T = TypeVar("T")

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
    auth_exceptions.TransportError,
    ConnectionError,
    TimeoutError,
    socket.timeout,
    TransientError,
)


def status_of(exc: BaseException) -> int | None:
    """The HTTP status carried by ``exc``, if any."""
    if isinstance(exc, HttpError):
        return int(exc.status_code) if exc.status_code is not None else None
    if isinstance(exc, api_exceptions.GoogleAPICallError):
        return int(exc.code) if exc.code is not None else None
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


def call(
    fn: Callable[[], T],
    *,
    deadline: float = 30.0,
    initial: float = 0.2,
    maximum: float = 5.0,
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
                # The type and status only: messages of storage errors quote request URLs,
                # which hold object names (and object names can hold patient names).
                status = status_of(exc)
                what = type(exc).__name__ + (f" (HTTP {status})" if status is not None else "")
                raise TransientError(f"gave up after {deadline:.0f}s: {what}") from exc
            sleep(delay * random.uniform(0.5, 1.0))
            delay = min(maximum, delay * 2)
