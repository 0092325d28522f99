"""Settle a ``conflict``: the store holds other bytes under the file's UIDs.

An operator who knows which version is right picks one:

- ``keep-stored``: the stored instance stays; the file is left out for good.
- ``replace``: the stored instance is deleted (DICOMweb ``instances.delete``) and the
  file is imported again: it is re-driven (``dicomflow.ops.redrive``), so a later batch
  imports and verifies it, and its new outcome supersedes the conflict in the totals.

Records (staging bucket)::

    state/resolved/<key>.json                  the claim: one resolution per conflict,
                                               create-if-absent, then marked done
    manifests/<batch>/resolutions/<key>.json   what was done, next to the batch's
                                               success and failure lists: the action, the
                                               deleted instance (UIDs and the stored
                                               checksum), the re-import (retry key, window)

A repeat of a finished resolution changes nothing; one that was cut short resumes (the
stored instance is deleted only while it still holds the other bytes, and the re-drive is
create-if-absent); another action on a resolved conflict is refused. Logs carry keys,
batch ids and actions, never UIDs or object names.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import requests

from dicomflow import log, objects, pool, retry, verify
from dicomflow.clock import iso
from dicomflow.config import MANIFESTS_PREFIX, STATE_PREFIX
from dicomflow.errors import PermanentError, Refused
from dicomflow.json_types import JSON
from dicomflow.ops import outcomes, redrive
from dicomflow.ops.outcomes import Outcome
from dicomflow.runtime import Context

logger = logging.getLogger(__name__)

RESOLVED_PREFIX = f"{STATE_PREFIX}resolved/"
KEEP_STORED, REPLACE = "keep-stored", "replace"
ACTIONS = (KEEP_STORED, REPLACE)


class ResolveRefused(Refused):
    """The key has no conflict to settle, or it was settled another way."""


def claim_name(key: str) -> str:
    return f"{RESOLVED_PREFIX}{key}.json"


def record_name(batch: str, key: str) -> str:
    return f"{MANIFESTS_PREFIX}{batch}/resolutions/{key}.json"


@dataclass(frozen=True)
class Resolution:
    """What ``resolve`` did."""

    key: str
    action: str
    batch: str
    result: str  # "resolved", "resumed" (cut short before) or "already" (done before)
    record: JSON

    def as_dict(self) -> JSON:
        return {
            "key": self.key,
            "action": self.action,
            "batch": self.batch,
            "result": self.result,
            "record": self.record,
        }


def find_conflict(ctx: Context, key: str, batch: str | None = None) -> Outcome:
    """The conflict outcome of ``key`` (read from ``batch``'s manifest when given).

    Raises:
        ResolveRefused: no such key, or its outcome is not a conflict.
    """
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    if batch is not None:
        lines = outcomes.manifest_lines(bucket, batch)
        found = {line["key"]: Outcome.of_manifest(batch, line) for line in lines}
    else:
        found = outcomes.read_all(bucket)
    outcome = found.get(key)
    if outcome is None:
        where = f" in batch {batch}" if batch else ""
        raise ResolveRefused(f"no file with key {key}{where}")
    if outcome.status != verify.CONFLICT:
        raise ResolveRefused(f"file {key} is {outcome.status}, not a conflict: nothing to settle")
    if outcome.batch is None or outcome.record is None:
        raise ResolveRefused(f"file {key} has no batch record")
    return outcome


def resolve(ctx: Context, key: str, action: str, batch: str | None = None) -> Resolution:
    """Settle the conflict of ``key`` with ``action`` (see the module docstring).

    Raises:
        ResolveRefused: see ``find_conflict``; or settled before with the other action.
        PermanentError, TransientError: the store refused or stayed unavailable.
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; choose from {', '.join(ACTIONS)}")
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    claim = objects.read_json(bucket, claim_name(key))
    if claim is not None and claim.get("action") != action:
        raise ResolveRefused(
            f"the conflict of {key} was settled with --{claim.get('action')} at {claim.get('at')}"
        )
    if claim is not None and claim.get("state") == "done":
        done = objects.read_json(bucket, str(claim.get("record"))) or {}
        done.pop(objects.TOKEN, None)
        return Resolution(key, action, str(claim["batch"]), "already", done)
    outcome = find_conflict(ctx, key, batch or (claim or {}).get("batch"))
    assert outcome.batch is not None and outcome.record is not None
    label = "resumed"
    if claim is None:
        doc = {"key": key, "action": action, "batch": outcome.batch, "at": iso(ctx.clock())}
        if objects.create(bucket, claim_name(key), {**doc, "state": "started"}):
            label = "resolved"
        claim = objects.read_json(bucket, claim_name(key)) or doc
        if claim.get("action") != action:
            raise ResolveRefused(f"the conflict of {key} was settled with --{claim['action']}")
    record = outcome.record
    line = outcome.line
    entry: JSON = {
        "key": key,
        "action": action,
        "batch": outcome.batch,
        "at": claim.get("at"),
        "reason": outcome.reason,
        "file": {
            "bucket": record.bucket,
            "name": record.name,
            "generation": record.generation,
            "checksum": line.get("checksum"),
        },
        "stored": {
            "study": record.study,
            "series": record.series,
            "sop": record.sop,
            "checksum": line.get("storedChecksum"),
        },
    }
    if action == REPLACE:
        entry["deleted"] = _delete_stored(ctx, record.sop, line.get("checksum"))
        result = redrive.redrive(ctx, outcome)
        if result.result in (redrive.SOURCE_MISSING, redrive.FILTERED, redrive.NOT_RETRYABLE):
            raise PermanentError(
                f"the stored instance of {key} is deleted but the file could not be re-driven: "
                f"{result.result}; run `dicomflow resolve {key} --replace` again after a fix"
            )
        entry["reimport"] = {
            "retryKey": result.retry_key,
            "window": result.window,
            "result": result.result,
        }
    objects.create(bucket, record_name(outcome.batch, key), entry)
    stored = objects.read_json(bucket, record_name(outcome.batch, key)) or entry
    done = {**claim, "state": "done", "record": record_name(outcome.batch, key)}
    found = objects.read(bucket, claim_name(key))
    if found is not None and found[0].get("state") != "done":
        objects.swap(bucket, claim_name(key), done, found[1])
    logger.info(
        "conflict resolved",
        extra=log.fields(key=key, batch=outcome.batch, action=action, result=label),
    )
    stored.pop(objects.TOKEN, None)
    return Resolution(key, action, outcome.batch, label, stored)


def _delete_stored(ctx: Context, sop: str | None, checksum: str | None) -> str:
    """Delete the stored instance with ``sop`` wherever the store keeps it: ``deleted``;
    ``absent`` when it is gone already, ``replaced`` when it holds the file's bytes
    already (a resumed resolution whose re-import went through: never deleted again)."""
    if not sop:
        raise PermanentError("the conflict's record has no SOP Instance UID")
    where = verify.search_sop(ctx, sop)
    if where is None:
        return "absent"
    if checksum:
        data = verify.retrieve_bytes(ctx, where[0], where[1], sop)
        if verify.checksum_of(data, checksum.split(":", 1)[0]) == checksum:
            return "replaced"
    client = ctx.dicomweb()
    try:
        retry.call(lambda: client.delete_instance(where[0], where[1], sop))
    except requests.HTTPError as exc:
        status = retry.status_of(exc)
        if status == 404:
            return "absent"
        raise PermanentError(f"Healthcare API {status} deleting the stored instance") from exc
    return "deleted"


def resolved_counts(ctx: Context) -> dict[str, int]:
    """Settled conflicts by action (one listing, one read each: they are few)."""
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    names = objects.names(bucket, RESOLVED_PREFIX)
    counts = dict.fromkeys(ACTIONS, 0)
    for doc in pool.pmap(lambda n: objects.read_json(bucket, n), names):
        if doc is not None and doc.get("action") in counts:
            counts[str(doc["action"])] += 1
    return counts
