"""The reference alert consumer (examples/alert_consumer) against the local Cloud Storage.

The function runs in functions-framework, its webhook is a loopback HTTP server, its
claims live in a bucket of the session's fake-gcs-server (behind the front that
enforces preconditions), and alerts arrive as Pub/Sub push requests: built here, and,
in the last test, pushed by the local Pub/Sub after dicomflow published them.
"""

from __future__ import annotations

import base64
import json
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import functions_framework
import pytest
from werkzeug.serving import make_server

from dicomflow import alerts
from localcloud.ports import HOST
from localcloud.pubsub import PubSubServer
from localcloud.storage import StorageServer
from tests import alert_contract
from tests.http_recorder import Recorder

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "examples" / "alert_consumer" / "main.py"
RUNBOOK = "https://example.org/dicomflow/docs/alerts.md"


@dataclass
class Consumer:
    app: Any
    webhook: Recorder
    bucket: Any

    def push(self, alert: dict[str, Any], message_id: str = "1") -> int:
        return self.push_raw(base64.b64encode(json.dumps(alert).encode()).decode(), message_id)

    def push_raw(self, data: str, message_id: str = "1") -> int:
        envelope = {
            "message": {"data": data, "messageId": message_id, "attributes": {}},
            "subscription": "projects/p/subscriptions/alerts-push",
        }
        return int(self.app.test_client().post("/", json=envelope).status_code)

    def forwarded(self) -> list[str]:
        return [body["text"] for _, _, body in self.webhook.requests]

    def claims(self) -> list[dict[str, Any]]:
        return [json.loads(b.download_as_bytes()) for b in self.bucket.list_blobs()]


@pytest.fixture
def consumer(
    gcs_server: StorageServer,
    recorder_factory: Callable[[list[int]], Recorder],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[[list[int]], Consumer]]:
    """A factory: the consumer with a webhook answering ``statuses`` (the last repeats)."""
    kept_main, kept_path = sys.modules.get("main"), list(sys.path)

    def make(statuses: list[int]) -> Consumer:
        webhook = recorder_factory(statuses)
        bucket = gcs_server.client().create_bucket(f"alert-ids-{uuid.uuid4().hex[:10]}")
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server.url)
        monkeypatch.setenv("WEBHOOK_URL", webhook.url + "/hook")
        monkeypatch.setenv("DEDUP_BUCKET", bucket.name)
        monkeypatch.setenv("ALERT_SCHEMA", str(ROOT / "dicomflow" / "alert.schema.json"))
        monkeypatch.setenv("RUNBOOK_URL", RUNBOOK)
        app = functions_framework.create_app("receive", str(SOURCE), "http")
        return Consumer(app, webhook, bucket)

    yield make
    # functions-framework loads the source as the module "main": put the pipeline's back.
    sys.path[:] = kept_path
    if kept_main is None:
        sys.modules.pop("main", None)
    else:
        sys.modules["main"] = kept_main


def log_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_a_repeated_alert_id_is_forwarded_once(
    consumer: Callable[[list[int]], Consumer], capsys: pytest.CaptureFixture[str]
) -> None:
    c = consumer([200])
    alert = alert_contract.runbook_example("export_failed")
    # Pub/Sub redelivers one message; dicomflow republishes after a crash (a new message).
    statuses = [c.push(alert, "m1"), c.push(alert, "m1"), c.push(alert, "m2")]
    assert statuses == [204, 204, 204]
    (text,) = c.forwarded()
    assert text.startswith(f"*ERROR* `export_failed` {alert['subject']}")
    assert f"runbook: {RUNBOOK}#export_failed" in text
    assert "date: 2026-11-25, attempt: 1" in text
    assert [claim["state"] for claim in c.claims()] == ["forwarded"]
    logged = [line["message"] for line in log_lines(capsys.readouterr().out)]
    assert logged == ["alert forwarded", *["alert not forwarded: repeat"] * 2]

    # The same alertId from another deployment is another alert.
    other = {**alert, "dicomStore": alert["dicomStore"].replace("primary", "research")}
    assert c.push(other, "m3") == 204
    assert len(c.forwarded()) == 2


def test_an_unknown_kind_is_forwarded_under_its_raw_name(
    consumer: Callable[[list[int]], Consumer], capsys: pytest.CaptureFixture[str]
) -> None:
    c = consumer([200])
    alert = {
        **alert_contract.runbook_example("backlog"),
        "kind": "replica_lag_high",
        "subject": "replica/2026-11-25",
        "details": {"studies": 50, "mismatched": {"count": 2}},
    }
    assert alert["kind"] not in alerts.ALERT_KINDS
    assert c.push(alert) == 204
    (text,) = c.forwarded()
    assert "`replica_lag_high` replica/2026-11-25" in text
    assert "newer than this consumer's schema" in text
    assert "#replica_lag_high" in text and "studies: 50" in text
    (line,) = log_lines(capsys.readouterr().out)
    assert (line["message"], line["known"]) == ("alert forwarded", False)


def b64(value: Any) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


def changed(change: Callable[[dict[str, Any]], Any]) -> str:
    """The quarantined example, changed, as push data."""
    alert = alert_contract.runbook_example("quarantined")
    change(alert)
    return b64(alert)


def bad_key(alert: dict[str, Any]) -> None:
    alert["details"]["sampleFiles"][0]["key"] = "Smith^John.dcm"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (lambda: "not base64!", "data is not base64-encoded JSON"),
        (lambda: b64([1, 2]), "$ fails type"),
        (lambda: changed(lambda a: a.pop("alertId")), "$: 'alertId' is a required property"),
        (
            lambda: changed(lambda a: a.update(schemaVersion=alerts.SCHEMA_VERSION + 1)),
            f"$.schemaVersion fails const {alerts.SCHEMA_VERSION}",
        ),
        (lambda: changed(lambda a: a.update(kind=7)), "$.kind fails enum"),
        (lambda: changed(bad_key), "$.details.sampleFiles[0].key fails pattern"),
    ],
)
def test_an_invalid_message_is_rejected_with_a_clear_log_line(
    consumer: Callable[[list[int]], Consumer],
    capsys: pytest.CaptureFixture[str],
    data: Callable[[], str],
    reason: str,
) -> None:
    c = consumer([200])
    assert c.push_raw(data(), "m9") == 400
    assert c.forwarded() == [] and c.claims() == []
    (line,) = log_lines(capsys.readouterr().out)
    assert line["severity"] == "ERROR" and line["messageId"] == "m9"
    assert line["message"].startswith("alert rejected: ") and reason in line["message"]
    assert "Smith" not in line["message"]  # rules and paths are logged, not values


def test_not_a_push_envelope_is_rejected(consumer: Callable[[list[int]], Consumer]) -> None:
    c = consumer([200])
    response = c.app.test_client().post("/", json={"data": "x"})
    assert response.status_code == 400
    assert (
        response.get_data(as_text=True) == "rejected: the request is not a Pub/Sub push envelope\n"
    )


def test_a_webhook_failure_is_retried_not_lost(consumer: Callable[[list[int]], Consumer]) -> None:
    c = consumer([500, 200])
    alert = alert_contract.runbook_example("conflict")
    assert c.push(alert) == 502  # Pub/Sub redelivers
    assert c.claims() == []  # released for the redelivery
    assert c.push(alert) == 204
    assert c.push(alert) == 204
    assert len(c.webhook.requests) == 2 and [cl["state"] for cl in c.claims()] == ["forwarded"]


def test_concurrent_deliveries_forward_once(consumer: Callable[[list[int]], Consumer]) -> None:
    c = consumer([200])
    alert = alert_contract.runbook_example("import_failed")
    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(lambda i: c.push(alert, f"m{i}"), range(6)))
    assert statuses.count(204) >= 1 and set(statuses) <= {204, 409}, statuses
    assert len(c.forwarded()) == 1
    assert c.push(alert) == 204 and len(c.forwarded()) == 1  # a later redelivery: a repeat


def test_alerts_pushed_by_pubsub_after_dicomflow_published_them_twice(
    consumer: Callable[[list[int]], Consumer],
    pubsub_fallback: PubSubServer,
    pubsub_client: Callable[[str], Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The real envelope: dicomflow's Pub/Sub message, pushed to the consumer over HTTP."""
    c = consumer([200])
    server = make_server(HOST, 0, c.app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    client = pubsub_client(pubsub_fallback.url)
    suffix = uuid.uuid4().hex[:10]
    topic = f"projects/local/topics/alerts-{suffix}"
    sub = f"projects/local/subscriptions/alerts-push-{suffix}"
    try:
        client.projects().topics().create(name=topic, body={}).execute()
        push = {"pushEndpoint": f"http://{HOST}:{server.server_port}/"}
        client.projects().subscriptions().create(
            name=sub, body={"topic": topic, "pushConfig": push}
        ).execute()
        alert = alerts.build_alert(**alert_contract.build_args("stalled"))
        for _ in range(2):  # a publisher that crashed after publishing publishes again
            client.projects().topics().publish(
                topic=topic, body={"messages": [alert.pubsub_message()]}
            ).execute()
        # Both are pushed, maybe at once: the second is a repeat, or busy (409) until the
        # first is forwarded, and then a repeat when Pub/Sub pushes it again.
        deadline = time.monotonic() + 10
        messages: list[str] = []
        while "alert not forwarded: repeat" not in messages and time.monotonic() < deadline:
            time.sleep(0.1)
            messages += [line["message"] for line in log_lines(capsys.readouterr().out)]
        assert messages.count("alert forwarded") == 1
        assert messages[-1] == "alert not forwarded: repeat"
        (text,) = c.forwarded()
        assert f"`stalled` {alert.subject}" in text
    finally:
        client.projects().subscriptions().delete(subscription=sub).execute()
        server.shutdown()
        thread.join()


def test_claims_expire_after_pubsub_stops_redelivering() -> None:
    """The documented lifecycle rule: claims outlive Pub/Sub's 7-day message retention."""
    (rule,) = json.loads((SOURCE.parent / "lifecycle.json").read_text())["rule"]
    assert rule["action"] == {"type": "Delete"}
    assert rule["condition"]["matchesPrefix"] == ["alert-ids/"]
    assert rule["condition"]["age"] > 7
    assert f"after {rule['condition']['age']} days" in (SOURCE.parent / "README.md").read_text()
