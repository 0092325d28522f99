"""A reference consumer of dicomflow alerts: Pub/Sub push -> schema check -> once -> webhook.

An HTTP Cloud Function (or a Cloud Run service running functions-framework) behind a
push subscription of the alerts topic. For each pushed message:

1. Check the alert against ``alert.schema.json``. A message that is not an alert is
   answered 400 with one ERROR log line saying why; Pub/Sub retries it, then moves it to
   the subscription's dead-letter topic. A kind the schema does not know is no error: it
   is forwarded under its raw name, as a newer dicomflow may send kinds this copy lacks.
2. Claim ``gs://$DEDUP_BUCKET/alert-ids/<hash of dicomStore and alertId>`` with
   create-if-absent (``if_generation_match=0``), so that every instance agrees. A claim
   marked forwarded means a repeat: answered 204 and not sent again. A claim another
   instance is still forwarding is answered 409 (Pub/Sub redelivers later); one whose
   lease ran out (that instance died) is taken over.
3. Post Slack-compatible JSON to ``$WEBHOOK_URL``, then mark the claim forwarded. A
   webhook failure releases the claim and answers 502, so the redelivery tries again.

A crash between any two steps leads to a redelivery, never to a lost alert. A lifecycle
rule on the bucket deletes claims after 14 days (see README.md).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import http.client
import json
import os
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import functions_framework
from flask import Request
from google.api_core import exceptions as gexc
from google.cloud import storage
from jsonschema import Draft202012Validator, ValidationError


def _setting(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise RuntimeError(f"{name} is not set; see examples/alert_consumer/README.md")
    return value


SCHEMA_PATH = Path(os.environ.get("ALERT_SCHEMA") or Path(__file__).with_name("alert.schema.json"))
SCHEMA = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
VALIDATOR = Draft202012Validator(SCHEMA)
WEBHOOK_URL = _setting("WEBHOOK_URL")
RUNBOOK_URL = os.environ.get("RUNBOOK_URL", "")
CLAIMS = storage.Client().bucket(_setting("DEDUP_BUCKET"))
CLAIM_PREFIX = "alert-ids/"
LEASE = timedelta(seconds=60)  # longer than a webhook call (timeout 10 s) and a claim write


def log(severity: str, message: str, **fields: Any) -> None:
    """One JSON line, as Cloud Logging reads it."""
    print(json.dumps({"severity": severity, "message": message, **fields}), flush=True)


@functions_framework.http
def receive(request: Request) -> tuple[str, int]:
    envelope = request.get_json(silent=True)
    message = envelope.get("message") if isinstance(envelope, dict) else None
    if not isinstance(message, dict):
        return _reject("the request is not a Pub/Sub push envelope", None)
    message_id = message.get("messageId")
    try:
        alert = json.loads(base64.b64decode(message.get("data") or "", validate=True))
    except (binascii.Error, ValueError):
        return _reject("data is not base64-encoded JSON", message_id)
    problems = [e for e in VALIDATOR.iter_errors(alert) if not _unknown_kind(e, alert)]
    if problems:
        return _reject("; ".join(_describe(e) for e in problems[:5]), message_id)
    ids = {"alertId": alert["alertId"], "kind": alert["kind"], "messageId": message_id}
    claim = _claim(alert)
    if isinstance(claim, str):
        log("INFO", f"alert not forwarded: {claim}", **ids)
        return "", 204 if claim == "repeat" else 409
    blob, generation = claim
    try:
        _post(alert)
    except (OSError, http.client.HTTPException) as exc:  # URLError and timeouts are OSErrors
        # Let the redelivery send it; if the delete fails, the lease runs out instead.
        with contextlib.suppress(gexc.GoogleAPIError):
            blob.delete(if_generation_match=generation)
        log("ERROR", "alert not forwarded: webhook failed", error=str(exc)[:200], **ids)
        return "", 502
    done = {"state": "forwarded", "at": datetime.now(UTC).isoformat(), **ids}
    # On 412 our lease ran out and another instance took over: it may send it again.
    with contextlib.suppress(gexc.PreconditionFailed):
        blob.upload_from_string(json.dumps(done), if_generation_match=generation)
    log("INFO", "alert forwarded", known=alert["kind"] in _known_kinds(), **ids)
    return "", 204


def _reject(reason: str, message_id: Any) -> tuple[str, int]:
    log("ERROR", f"alert rejected: {reason}", messageId=message_id)
    return f"rejected: {reason}\n", 400


def _known_kinds() -> list[str]:
    return list(SCHEMA["$defs"]["kind"]["enum"])


def _unknown_kind(error: ValidationError, alert: Any) -> bool:
    """An enum failure of ``kind`` alone, with a name: a kind newer than this schema."""
    kind = alert.get("kind") if isinstance(alert, dict) else None
    named = isinstance(kind, str) and bool(kind)
    return error.validator == "enum" and list(error.absolute_path) == ["kind"] and named


def _describe(error: ValidationError) -> str:
    """Where and which rule failed, without copying the message's values into the log."""
    if error.validator == "required":
        return f"{error.json_path}: {error.message}"
    return f"{error.json_path} fails {error.validator} {json.dumps(error.validator_value)[:80]}"


def _claim(alert: dict[str, Any]) -> tuple[storage.Blob, int] | str:
    """Own the alert's claim and return it with its generation, or why not."""
    key = hashlib.sha256(f"{alert['dicomStore']}\n{alert['alertId']}".encode()).hexdigest()
    blob = CLAIMS.blob(f"{CLAIM_PREFIX}{key[:32]}.json")
    now = datetime.now(UTC)
    mine = json.dumps({"state": "forwarding", "until": (now + LEASE).isoformat()})
    try:
        blob.upload_from_string(mine, if_generation_match=0)
        return blob, int(blob.generation)
    except gexc.PreconditionFailed:
        pass
    held = CLAIMS.get_blob(blob.name)
    if held is None:
        return "being released by another instance"
    try:
        doc = json.loads(held.download_as_bytes(if_generation_match=held.generation))
    except (gexc.NotFound, gexc.PreconditionFailed):
        return "claim changed while read"
    except ValueError:
        doc = {}  # unreadable: taken over like an expired lease
    if doc.get("state") == "forwarded":
        return "repeat"
    if str(doc.get("until", "")) > now.isoformat():  # both UTC ISO: text order is time order
        return "being forwarded by another instance"
    try:
        blob.upload_from_string(mine, if_generation_match=held.generation)
    except gexc.PreconditionFailed:
        return "taken over by another instance"
    return blob, int(blob.generation)


def _post(alert: dict[str, Any]) -> None:
    """Post the alert to the webhook as Slack-compatible JSON (``text``, mrkdwn)."""
    kind = alert["kind"]
    lines = [f"*{alert['severity']}* `{kind}` {alert['subject']}"]
    if kind not in _known_kinds():
        lines.append(f"(kind `{kind}` is newer than this consumer's schema)")
    scalars = {k: v for k, v in alert["details"].items() if not isinstance(v, dict | list)}
    if scalars:
        lines.append(", ".join(f"{k}: {v}" for k, v in scalars.items()))
    lines.append(f"store {alert['dicomStore']} at {alert['time']}, alertId {alert['alertId']}")
    if RUNBOOK_URL:
        lines.append(f"runbook: {RUNBOOK_URL}#{kind}")
    body = json.dumps({"text": "\n".join(lines)}).encode()
    request = urllib.request.Request(
        WEBHOOK_URL, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()
