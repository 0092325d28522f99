"""Erase a study for good: delete it from the live store, and keep every restore from
bringing it back.

Flow (``dicomflow erase --study UID``)::

    tombstone  tombstones/<key id>-<hex>.json, create-if-absent, state "erasing"
               (first: from this moment every restore and drill leaves the study out)
    delete     studies.delete on the live store: a long-running operation, recorded
               in the tombstone, followed to the end
    check      one QIDO: no instance of the study is left
    tombstone  state "erased" (or "failed", with the operation's error code)

A repeat resumes: the tombstone says which operation to follow, or that it is done.
A study the live store does not hold still gets its tombstone (its backups may hold
it). Logs and results carry the tombstone's label, never the UID; the reason is kept
in the tombstone only, since an operator may type anything there.
"""

from __future__ import annotations

import logging
import time

from dicomflow import keys, log, restore, retry, store, tombstones, verify
from dicomflow.clock import iso
from dicomflow.errors import PermanentError, TransientError
from dicomflow.json_types import JSON
from dicomflow.runtime import Context

logger = logging.getLogger(__name__)

ERASING, ERASED, FAILED = "erasing", "erased", "failed"
QUOTA_WAIT_SECONDS = 600.0


def erase(
    ctx: Context,
    study: str,
    reason: str | None = None,
    *,
    wait: bool = True,
    poll_seconds: float = 2.0,
    timeout: float | None = None,
) -> JSON:
    """Tombstone ``study`` and delete it from the live store (see the module docstring).

    Returns ``{status, label, keyId, operation, tombstone, ...}``; ``status`` is
    ``erased``, ``deleting`` (not waited for, or still running at the timeout) or
    ``failed``.

    Raises:
        ConfigError: no deployment key is configured.
        PermanentError, TransientError: the store refused the delete or stayed unavailable.
    """
    study = study.strip()
    if not study:
        raise PermanentError("no Study Instance UID given")
    key = keys.load(ctx.settings)
    label = tombstones.label_of(key, study)
    live = ctx.settings.dicom_store
    tombstones.write(
        ctx,
        label,
        {
            "label": label,
            "keyId": key.key_id,
            "store": str(live),
            "erasedAt": iso(ctx.clock()),
            "reason": reason,
            "state": ERASING,
        },
    )
    found = tombstones.read(ctx, label)
    assert found is not None
    doc, generation = found
    result: JSON = {
        "label": label,
        "keyId": doc.get("keyId"),
        "store": str(live),
        "tombstone": f"gs://{ctx.settings.staging_bucket}/{tombstones.name_of(label)}",
        "erasedAt": doc.get("erasedAt"),
    }
    if doc.get("state") == ERASED:
        return {**result, "status": ERASED, "operation": doc.get("operation"), "repeat": True}
    if not doc.get("operation") and not doc.get("notInStore"):
        operation = _start_delete(ctx, study)
        if operation is None:
            doc["notInStore"] = True
        else:
            doc["operation"] = operation
        generation = tombstones.update(ctx, label, doc, generation) or generation
    result["operation"] = doc.get("operation")
    logger.info(
        "study erasure started", extra=log.fields(label=label, operation=doc.get("operation"))
    )
    if not wait:
        return {**result, "status": ERASING}
    if doc.get("operation"):
        op = restore.wait_operation(
            ctx, str(doc["operation"]), poll_seconds=poll_seconds, timeout=timeout
        )
        if not op.get("done"):
            return {**result, "status": ERASING, "problems": ["still deleting at the timeout"]}
        error = op.get("error")
        if isinstance(error, dict):
            doc.update(state=FAILED, deleteError={"code": error.get("code")})
            tombstones.update(ctx, label, doc, generation)
            logger.error(
                "study erasure failed",
                extra=log.fields(label=label, operation=doc["operation"], code=error.get("code")),
            )
            return {
                **result,
                "status": FAILED,
                "problems": [f"studies.delete failed: code {error.get('code')}"],
            }
    left = len(verify.search_study(ctx, study))
    if left:
        return {**result, "status": FAILED, "problems": [f"{left} instances are still stored"]}
    doc.update(state=ERASED, finishedAt=iso(ctx.clock()))
    tombstones.update(ctx, label, doc, generation)
    logger.info(
        "study erased",
        extra=log.fields(
            label=label, operation=doc.get("operation"), inStore=not doc.get("notInStore")
        ),
    )
    return {**result, "status": ERASED, "notInStore": bool(doc.get("notInStore"))}


def _start_delete(ctx: Context, study: str) -> str | None:
    """Start ``studies.delete``; its operation, or None when the store has no such study.

    Errors are raised without the study's path (the service's message holds it).
    """
    deadline = time.monotonic() + QUOTA_WAIT_SECONDS
    while True:
        try:
            return str(store.delete_study(ctx, ctx.settings.dicom_store, study)["name"])
        except store.QuotaExceeded:
            if time.monotonic() > deadline:
                raise TransientError("studies.delete: 429 for too long") from None
            time.sleep(5.0)
        except PermanentError as exc:
            if store.is_not_found(exc):
                return None
            status = retry.status_of(exc.__cause__) if exc.__cause__ else None
            raise PermanentError(f"studies.delete refused: HTTP {status or '?'}") from None
