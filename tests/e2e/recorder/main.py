"""A function target that records every CloudEvent it receives, one JSON line each.

localcloud serves it in place of the real main.py (LOCALCLOUD_FUNCTIONS_SOURCE)
so that the e2e test can check what Eventarc's stand-in delivers. It records the
attributes as dicomflow's functions read them (percent-decoded), and the wire
form of the subject beside them.
"""

from __future__ import annotations

import json
import os
import threading

import functions_framework
from cloudevents.http import CloudEvent

from dicomflow.events import decode_attributes

_lock = threading.Lock()


def _record(function: str, event: CloudEvent) -> None:
    line = json.dumps(
        {
            "function": function,
            "attributes": dict(decode_attributes(event).get_attributes()),
            "wireSubject": event.get("subject"),
            "data": event.data,
        }
    )
    with _lock, open(os.environ["RECORDER_FILE"], "a") as out:
        out.write(line + "\n")


@functions_framework.cloud_event
def ingest(cloud_event: CloudEvent) -> None:
    _record("ingest", cloud_event)


@functions_framework.cloud_event
def report(cloud_event: CloudEvent) -> None:
    _record("report", cloud_event)


@functions_framework.cloud_event
def export(cloud_event: CloudEvent) -> None:
    _record("export", cloud_event)
