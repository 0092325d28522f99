"""Reading alerts back from a Pub/Sub pull subscription (``dicomflow alerts tail``), and
counting the events waiting on a dead-letter subscription (``dicomflow status``).

``pull(ctx, subscription, ...)`` returns decoded alert bodies (see
``dicomflow.alerts``), each with its routing attributes, and acknowledges them
unless asked not to. It talks to Pub/Sub's REST API through the same client
as the functions (``ctx.pubsub()``), so it works against localcloud and a real
project alike.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from googleapiclient.errors import HttpError

from dicomflow.errors import PermanentError, TransientError
from dicomflow.json_types import JSON
from dicomflow.runtime import Context

if TYPE_CHECKING:
    from googleapiclient.http import HttpRequest  # slow to import; requests come built

_PAGE = 100
EMPTY_POLLS = 3
POLL_SECONDS = 0.5


def subscription_path(name: str, project_of_topic: str) -> str:
    """``projects/P/subscriptions/S`` from a full path or a short name (the topic's project)."""
    if name.startswith("projects/"):
        parts = name.split("/")
        if len(parts) != 4 or parts[2] != "subscriptions" or not parts[1] or not parts[3]:
            raise ValueError(f"expected projects/P/subscriptions/S, got {name!r}")
        return name
    if not name or "/" in name:
        raise ValueError(f"expected a subscription name or projects/P/subscriptions/S: {name!r}")
    return f"projects/{project_of_topic}/subscriptions/{name}"


UNDECODABLE = "undecodable"


def decode(received: JSON) -> JSON:
    """One received message as ``{...alert body, "attributes": {...}, "messageId"}``.

    A message whose data is not a JSON object gets the kind ``undecodable``, which no alert
    has (``unreadable`` is an alert kind)."""
    message = received.get("message") or {}
    try:
        body = json.loads(base64.b64decode(message.get("data") or b""))
    except (binascii.Error, ValueError):
        body = {"kind": UNDECODABLE}
    if not isinstance(body, dict):
        body = {"kind": UNDECODABLE}
    body["attributes"] = dict(message.get("attributes") or {})
    body["messageId"] = message.get("messageId")
    return body


def _call(request: HttpRequest) -> JSON:
    try:
        result: JSON = request.execute(num_retries=3)
    except HttpError as exc:
        status = int(exc.resp.status)
        if status == 429 or status >= 500:
            raise TransientError(f"Pub/Sub answered HTTP {status}") from exc
        raise PermanentError(f"Pub/Sub answered HTTP {status}: {exc.reason}") from exc
    except (TimeoutError, OSError) as exc:
        raise TransientError(f"Pub/Sub unreachable: {exc}") from exc
    return result


def count_waiting(ctx: Context, subscription: str) -> int:
    """How many messages wait on ``subscription`` (any messages, not only alerts); each
    is handed back at once, so the count consumes nothing.

    Raises:
        PermanentError: the subscription does not exist or is not readable.
        TransientError: Pub/Sub answered 429/5xx or could not be reached.
    """
    subs = ctx.pubsub().projects().subscriptions()
    seen: set[str] = set()
    empty = 0
    while empty < EMPTY_POLLS:
        body = {"maxMessages": _PAGE, "returnImmediately": True}
        received = (
            _call(subs.pull(subscription=subscription, body=body)).get("receivedMessages") or []
        )
        if not received:
            empty += 1
            time.sleep(POLL_SECONDS)
            continue
        ids = [item["ackId"] for item in received]
        _call(
            subs.modifyAckDeadline(
                subscription=subscription, body={"ackIds": ids, "ackDeadlineSeconds": 0}
            )
        )
        fresh = {str((item.get("message") or {}).get("messageId")) for item in received} - seen
        if not fresh:
            break  # only messages counted already, handed back by this count
        seen |= fresh
        empty = 0
    return len(seen)


def pull(
    ctx: Context,
    subscription: str,
    *,
    max_messages: int | None = None,
    follow: bool = False,
    timeout: float | None = None,
    ack: bool = True,
    on_alert: Callable[[JSON], None] | None = None,
) -> list[JSON]:
    """Pull alerts until the subscription is empty (or, with ``follow``, until stopped).

    Args:
        subscription: ``projects/P/subscriptions/S``.
        max_messages: stop after this many alerts.
        follow: keep waiting for new alerts (until ``timeout`` or ``max_messages``).
        timeout: with ``follow``, stop after this many seconds.
        ack: acknowledge what was pulled (the default), so the next tail starts after it.
        on_alert: called with each alert as it arrives (for printing while following).

    Raises:
        PermanentError: the subscription does not exist or is not readable.
        TransientError: Pub/Sub answered 429/5xx or could not be reached.
    """
    subs = ctx.pubsub().projects().subscriptions()
    got: list[JSON] = []
    seen: set[str] = set()
    empty = 0
    stop = None if timeout is None else time.monotonic() + timeout
    while max_messages is None or len(got) < max_messages:
        if stop is not None and time.monotonic() >= stop:
            break
        want = _PAGE if max_messages is None else min(_PAGE, max_messages - len(got))
        # Short polls rather than waiting pulls, so that --timeout and Ctrl-C act at once.
        # The real service may answer an immediate pull with nothing while messages wait,
        # so "empty" takes EMPTY_POLLS answers in a row.
        response = _call(
            subs.pull(
                subscription=subscription, body={"maxMessages": want, "returnImmediately": True}
            )
        )
        received = response.get("receivedMessages") or []
        if not received:
            empty += 1
            if not follow and empty >= EMPTY_POLLS:
                break
            time.sleep(POLL_SECONDS)
            continue
        empty = 0
        fresh = 0
        for item in received:
            alert = decode(item)
            if alert["messageId"] in seen:
                continue  # handed back by an earlier pull without --ack
            seen.add(str(alert["messageId"]))
            fresh += 1
            if max_messages is not None and len(got) >= max_messages:
                continue
            got.append(alert)
            if on_alert:
                on_alert(alert)
        ids = [item["ackId"] for item in received]
        if ack:
            _call(subs.acknowledge(subscription=subscription, body={"ackIds": ids}))
        else:
            # Hand them back at once, so another reader (or the next tail) sees them.
            _call(
                subs.modifyAckDeadline(
                    subscription=subscription, body={"ackIds": ids, "ackDeadlineSeconds": 0}
                )
            )
            if not fresh and not follow:
                break
    return got
