"""A Cloud Function that records the subject and object name of each event, as it reads them.

Served by functions-framework in test_delivery, so that what it records is what
a real function sees after dicomflow decodes the event.
"""

from __future__ import annotations

import threading

import functions_framework
from cloudevents.http import CloudEvent

from dicomflow.events import decode_attributes

received: list[tuple[str, str]] = []
_lock = threading.Lock()


@functions_framework.cloud_event
def record(cloud_event: CloudEvent) -> None:
    event = decode_attributes(cloud_event)
    with _lock:
        received.append((str(event["subject"]), str(event.data["name"])))
