"""Cloud Functions entry points. Thin: decode the event, call dicomflow, decide on retry.

The return values are for tests; functions-framework ignores them.

Settings and clients are created once per process: at import on Cloud Run
(and localcloud), where a bad setting stops start-up with the setting named,
and on first use elsewhere (tests).
"""

from __future__ import annotations

import functions_framework
from cloudevents.http import CloudEvent

from dicomflow import functions, runtime
from dicomflow.json_types import JSON

runtime.startup()


@functions_framework.cloud_event  # type: ignore[arg-type]  # returns a result for tests
def ingest(cloud_event: CloudEvent) -> JSON:
    """Storage finalize events and the minute tick."""
    return runtime.handle("ingest", functions.ingest, cloud_event)


@functions_framework.cloud_event  # type: ignore[arg-type]  # returns a result for tests
def report(cloud_event: CloudEvent) -> JSON:
    """The minute tick: track operations, verify batches, publish alerts."""
    return runtime.handle("report", functions.report, cloud_event)


@functions_framework.cloud_event  # type: ignore[arg-type]  # returns a result for tests
def export(cloud_event: CloudEvent) -> JSON:
    """The daily export tick."""
    return runtime.handle("export", functions.export, cloud_event)
