"""publish_once against a real Pub/Sub (emulator or fallback) and fake-gcs-server."""

from __future__ import annotations

import base64
import json
import logging
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.cloud import storage

from dicomflow import alerts, log, runtime
from dicomflow.config import load_settings
from dicomflow.errors import PermanentError
from localcloud.pubsub import PubSubServer
from localcloud.storage import StorageServer
from tests.deployment_key import KEY_FILE

STORE = "projects/local/locations/us/datasets/d/dicomStores/s"
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


@pytest.fixture
def ctx(gcs_server: StorageServer, pubsub: PubSubServer) -> Iterator[runtime.Context]:
    suffix = uuid.uuid4().hex[:8]
    staging = f"staging-{suffix}"
    gcs = gcs_server.client()
    gcs.create_bucket(staging)
    settings = load_settings(
        {
            "DICOMFLOW_DICOM_STORE": STORE,
            "DICOMFLOW_LANDING_BUCKET": "landing",
            "DICOMFLOW_STAGING_BUCKET": staging,
            "DICOMFLOW_BACKUP_BUCKET": "backups",
            "DICOMFLOW_ALERTS_TOPIC": f"projects/local/topics/alerts-{suffix}",
            "DICOMFLOW_KEY_FILE": KEY_FILE,
            "DICOMFLOW_PUBSUB_ENDPOINT": pubsub.url,
            "STORAGE_EMULATOR_HOST": gcs_server.url,
        }
    )
    context = runtime.Context(settings=settings, storage=gcs)
    topic = str(settings.alerts_topic)
    ps = context.pubsub()
    ps.projects().topics().create(name=topic, body={}).execute()
    ps.projects().subscriptions().create(
        name=f"projects/local/subscriptions/alerts-{suffix}",
        body={"topic": topic, "ackDeadlineSeconds": 10},
    ).execute()
    yield context
    context.pubsub().close()


def _pull(ctx: runtime.Context) -> list[dict[str, Any]]:
    """Every message on the test's subscription, acknowledged."""
    sub = str(ctx.settings.alerts_topic).replace("/topics/", "/subscriptions/")
    got: list[dict[str, Any]] = []
    for _ in range(3):
        resp = (
            ctx.pubsub()
            .projects()
            .subscriptions()
            .pull(subscription=sub, body={"maxMessages": 100, "returnImmediately": True})
            .execute()
        )
        received = resp.get("receivedMessages", [])
        if received:
            ctx.pubsub().projects().subscriptions().acknowledge(
                subscription=sub, body={"ackIds": [m["ackId"] for m in received]}
            ).execute()
            got.extend(m["message"] for m in received)
    return got


def _alert(subject: str = "exports/2026-11-25") -> alerts.Alert:
    return alerts.build_alert(
        "export_failed", subject, "ERROR", STORE, {"date": "2026-11-25", "found": 3}, NOW
    )


def _marker(ctx: runtime.Context, alert: alerts.Alert) -> dict[str, Any]:
    blob = ctx.storage.bucket(ctx.settings.staging_bucket).blob(alerts.marker_name(alert.alert_id))
    return dict(json.loads(blob.download_as_bytes()))


def test_publishes_once_with_schema_and_attributes(ctx: runtime.Context) -> None:
    alert = _alert()
    assert alerts.publish_once(ctx, alert) is True
    assert alerts.publish_once(ctx, alert) is False
    # A repeat built later (other time, other details) is the same alert.
    later = alerts.build_alert(
        "export_failed", "exports/2026-11-25", "ERROR", STORE, {"x": 1}, NOW + timedelta(1)
    )
    assert alerts.publish_once(ctx, later) is False
    messages = _pull(ctx)
    assert len(messages) == 1
    msg = messages[0]
    assert msg["attributes"] == {
        "kind": "export_failed",
        "severity": "ERROR",
        "dicomStore": STORE,
        "alertId": alert.alert_id,
        "schemaVersion": "2",
    }
    body = json.loads(base64.b64decode(msg["data"]))
    assert body["schemaVersion"] == 2 and body["alertId"] == alert.alert_id
    assert body["details"] == {"date": "2026-11-25", "found": 3}
    assert _marker(ctx, alert)["state"] == "published"


def test_concurrent_callers_publish_once(ctx: runtime.Context) -> None:
    alert = _alert("exports/2026-11-26")
    results: list[bool] = []
    errors: list[BaseException] = []

    def worker() -> None:
        # googleapiclient clients are per thread; the Context hands each thread its own.
        try:
            results.append(alerts.publish_once(ctx, alert))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            ctx.pubsub().close()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(results) == [False] * 7 + [True]
    assert [m["attributes"]["alertId"] for m in _pull(ctx)] == [alert.alert_id]


def test_crashed_publisher_is_taken_over_after_its_lease(ctx: runtime.Context) -> None:
    alert = _alert("exports/2026-11-27")
    blob = ctx.storage.bucket(ctx.settings.staging_bucket).blob(alerts.marker_name(alert.alert_id))
    # A caller claimed the alert and died before (or after) publishing.
    blob.upload_from_string(
        json.dumps({"state": "publishing", "leaseUntil": "2026-01-01T00:00:00+00:00"}),
        if_generation_match=0,
    )
    assert alerts.publish_once(ctx, alert) is True
    assert [m["attributes"]["alertId"] for m in _pull(ctx)] == [alert.alert_id]
    assert alerts.publish_once(ctx, alert) is False


def test_live_claim_is_waited_for_not_duplicated(ctx: runtime.Context) -> None:
    alert = _alert("exports/2026-11-28")
    blob: storage.Blob = ctx.storage.bucket(ctx.settings.staging_bucket).blob(
        alerts.marker_name(alert.alert_id)
    )
    until = (datetime.now(UTC) + timedelta(seconds=30)).isoformat()
    blob.upload_from_string(
        json.dumps({"state": "publishing", "leaseUntil": until}), if_generation_match=0
    )

    def finish_other_publisher() -> None:
        blob.upload_from_string(json.dumps({"state": "published", "leaseUntil": until}))

    timer = threading.Timer(0.5, finish_other_publisher)
    timer.start()
    try:
        assert alerts.publish_once(ctx, alert) is False
    finally:
        timer.join()
    assert _pull(ctx) == []


def test_missing_topic_is_permanent_and_releases_the_claim(ctx: runtime.Context) -> None:
    settings = ctx.settings
    broken = runtime.Context(
        settings=type(settings)(
            **{
                **{f: getattr(settings, f) for f in settings.__dataclass_fields__},
                "alerts_topic": type(settings.alerts_topic)("local", "no-such-topic"),
            }
        ),
        storage=ctx.storage,
    )
    alert = _alert("exports/2026-11-29")
    with pytest.raises(PermanentError, match="HTTP 404"):
        alerts.publish_once(broken, alert)
    broken.pubsub().close()
    # The claim is gone, so a fixed configuration publishes at once.
    assert alerts.publish_once(ctx, alert) is True


def test_each_published_alert_is_one_log_line_at_its_severity(
    ctx: runtime.Context, caplog: pytest.LogCaptureFixture
) -> None:
    """The line a log-based metric counts (docs/alerts.md, "The log line")."""
    alert = alerts.build_alert(
        "backlog", "backlog/20261125T124000Z", "WARNING", STORE, {"batches": 1}, NOW
    )
    with caplog.at_level(logging.INFO, logger="dicomflow.alerts"):
        assert alerts.publish_once(ctx, alert) is True
        assert alerts.publish_once(ctx, alert) is False  # a repeat logs nothing
    lines = [json.loads(log.JsonFormatter().format(r)) for r in caplog.records]
    published = [line for line in lines if line["message"] == "alert published"]
    assert len(published) == 1
    assert {k: published[0][k] for k in ("severity", "kind", "alertId")} == {
        "severity": "WARNING",
        "kind": "backlog",
        "alertId": alert.alert_id,
    }
    assert published[0]["messageId"]
