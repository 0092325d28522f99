"""Restore a dated backup into a DICOM store, and check the result against the backup.

``run`` serves ``dicomflow restore``; the drill uses the steps one by one: ``load_backup``,
``sample_studies``, ``stage_source``, ``start_import``, ``check`` and ``clean_up``.
Tombstoned studies are always left out.

See docs/architecture.md#restore
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import date

from google.api_core import exceptions as gexc

from dicomflow import (
    backup,
    keys,
    log,
    objects,
    operations,
    pool,
    retry,
    store,
    tombstones,
    verify,
)
from dicomflow.config import RESTORES_PREFIX, parse_mime_type
from dicomflow.errors import Refused, TransientError
from dicomflow.json_types import JSON
from dicomflow.names import DicomStoreName
from dicomflow.runtime import Context

logger = logging.getLogger(__name__)

# How long an import call is retried on 429 (the service's cap on running operations).
QUOTA_WAIT_SECONDS = 600.0
QIDO_PAGE = 5000
COPY_THREADS = 8
RESTORE_KIND = "restore"
DEFAULT_VERIFY_BYTES = 20

Progress = Callable[[str, int, int | None], None]


class RestoreRefused(Refused):
    """The restore cannot run as asked (no such backup, not DICOM, the live store...)."""


@dataclass(frozen=True)
class BackupObject:
    """One exported instance: its object name in the backup bucket and its UIDs."""

    name: str
    study: str
    series: str
    sop: str


@dataclass
class Backup:
    """A dated backup as found: its manifest and the objects its folder holds now."""

    day: date
    bucket: str
    folder: str
    manifest: JSON
    objects: list[BackupObject]
    # The folder also holds reruns' sub-prefixes, so it cannot be imported as a whole.
    nested: bool = False

    @property
    def uri(self) -> str:
        return f"gs://{self.bucket}/{self.folder}"

    def studies(self) -> list[str]:
        return sorted({o.study for o in self.objects})

    def by_series(self, studies: Iterable[str] | None = None) -> dict[tuple[str, str], set[str]]:
        """(study, series) -> SOP Instance UIDs of the folder, for ``studies`` (default all)."""
        wanted = None if studies is None else set(studies)
        found: dict[tuple[str, str], set[str]] = {}
        for o in self.objects:
            if wanted is None or o.study in wanted:
                found.setdefault((o.study, o.series), set()).add(o.sop)
        return found

    def manifest_series(self) -> dict[str, int]:
        """``study/series`` -> objects the export wrote (``backup.series_counts``)."""
        return dict(self.manifest.get("series") or {})


def load_backup(ctx: Context, day: date) -> Backup:
    """The backup dated ``day``: its latest complete attempt (``backup.pick_attempt``), with
    its manifest and the objects its folder holds, from one listing of the dated folder.

    Raises:
        RestoreRefused: no backup that date, an export still writing it, or a backup
            in a rendered-image mimeType.
    """
    settings = ctx.settings
    dated = backup.dated_folder(settings, day)
    bucket = ctx.storage.bucket(settings.backup_bucket)
    uri = f"gs://{settings.backup_bucket}/{dated}"
    try:
        blobs = list(objects.blobs(bucket, dated))
        manifests: dict[int, JSON] = {}
        for blob in blobs:
            number = backup.attempt_of(blob.name[len(dated) :])
            doc = objects.read_json(bucket, blob.name) if number is not None else None
            if number is not None and doc is not None:
                manifests[number] = doc
    except gexc.NotFound:
        raise RestoreRefused(f"backup bucket {settings.backup_bucket} not found") from None
    attempt = backup.pick_attempt(manifests)
    if attempt is None:
        dates = objects.folders(bucket, f"{settings.backup_prefix}/")[-5:]
        have = f"; latest backups: {', '.join(dates)}" if dates else "; there are no backups"
        raise RestoreRefused(f"no backup dated {day.isoformat()}: {uri} has no manifest{have}")
    manifest = manifests[attempt]
    folder = backup.attempt_folder(settings, day, attempt)
    if manifest.get("state") != "finished":
        raise RestoreRefused(
            f"the backup dated {day.isoformat()} is still being written "
            f"(attempt {manifest.get('attempt')}); wait for its export to finish"
        )
    mime = str(manifest.get("mimeType") or "application/dicom")
    try:
        kind = parse_mime_type(mime)[0]
    except ValueError:
        kind = mime
    if kind != "application/dicom":
        raise RestoreRefused(
            f"the backup dated {day.isoformat()} was written as {kind}: rendered images "
            "cannot be imported into a DICOM store; restore a backup written as "
            "application/dicom"
        )
    found: list[BackupObject] = []
    nested = False
    for blob in blobs:
        relative = backup.relative_name(blob.name, folder)
        nested = nested or (blob.name.startswith(folder) and relative is None)
        key = backup.instance_key(relative) if relative is not None else None
        if key is None or not blob.name.lower().endswith(".dcm"):
            continue
        study, series, sop = key.split("/")
        found.append(BackupObject(blob.name, study, series, sop))
    return Backup(day, settings.backup_bucket, folder, manifest, found, nested)


def erased_studies(
    ctx: Context, studies: list[str], previous_keys: Iterable[keys.DeploymentKey] = ()
) -> set[str]:
    """The studies among ``studies`` that were erased and must never come back.

    Raises:
        RestoreRefused: a tombstone was made with a key that is not at hand.
    """
    try:
        return tombstones.erased(ctx, studies, previous_keys)
    except tombstones.UnknownKey as exc:
        raise RestoreRefused(str(exc)) from None


def check_target(ctx: Context, target: DicomStoreName, into_live: bool) -> None:
    """Refuse the live store unless ``into_live``.

    Raises:
        RestoreRefused: ``target`` is the live store and ``into_live`` is False.
    """
    if target == ctx.settings.dicom_store and not into_live:
        raise RestoreRefused(
            f"{target} is the live store that dicomflow ingests into; restore into another "
            "store, or pass --into-live to restore into it on purpose"
        )


def sample_studies(studies: list[str], count: int, rng: random.Random) -> list[str]:
    """``count`` studies at random (all of them when ``count`` is 0 or covers them). Pure."""
    if count <= 0 or count >= len(studies):
        return sorted(studies)
    return sorted(rng.sample(sorted(studies), count))


def restore_id(day: date) -> str:
    """A fresh id for one restore: ``<date>-<8 hex>``."""
    return f"{day.isoformat()}-{uuid.uuid4().hex[:8]}"


def copies_prefix(rid: str) -> str:
    """Where a partial restore's copies go in the staging bucket."""
    return f"{RESTORES_PREFIX}{rid}/"


def stage_source(
    ctx: Context,
    source: Backup,
    studies: list[str],
    rid: str,
    progress: Progress | None = None,
) -> str:
    """The import URI for ``studies`` of ``source``: the attempt's folder when that is all
    of it (and holds no rerun), else a copy of just those objects under
    ``restores/<rid>/`` (server side)."""
    if not source.nested and set(studies) == set(source.studies()):
        return f"{source.uri}**.dcm"
    wanted = set(studies)
    chosen = [o for o in source.objects if o.study in wanted]
    backups = ctx.storage.bucket(source.bucket)
    staging = ctx.storage.bucket(ctx.settings.staging_bucket)
    prefix = copies_prefix(rid)
    done = 0
    lock = threading.Lock()
    if progress:
        progress("copy", 0, len(chosen))

    # Unconditional, and retried: a repeat copies the same source generation again.
    policy = retry.storage()

    def copy(item: BackupObject) -> None:
        nonlocal done
        target = staging.blob(prefix + item.name[len(source.folder) :])
        token: str | None = None
        # A rewrite may need several calls (another location or storage class).
        while True:
            token, _, _ = target.rewrite(
                backups.blob(item.name), token=token, retry=policy, timeout=retry.DEADLINE
            )
            if token is None:
                break
        with lock:
            done += 1
            if progress:
                progress("copy", done, len(chosen))

    pool.pmap(copy, chosen)
    return f"gs://{ctx.settings.staging_bucket}/{prefix}**.dcm"


def is_copy(ctx: Context, uri: str) -> bool:
    """Whether an import URI of ``stage_source`` points at copies (not the dated folder)."""
    return uri.startswith(f"gs://{ctx.settings.staging_bucket}/{RESTORES_PREFIX}")


def clean_up(ctx: Context, rid: str) -> int:
    """Delete the copies of restore ``rid``; how many went."""
    staging = ctx.storage.bucket(ctx.settings.staging_bucket)
    names = objects.names(staging, copies_prefix(rid))
    pool.pmap(lambda name: objects.delete(staging, name), names)
    return len(names)


def start_import(
    ctx: Context,
    target: DicomStoreName,
    uri: str,
    subject: str,
    quota_wait: float = QUOTA_WAIT_SECONDS,
) -> str:
    """Start the import into ``target``, waiting out 429s; record it as ours. The name.

    Raises:
        PermanentError: the service refused the import (404: no such store...).
        TransientError: 429 for longer than ``quota_wait`` seconds, or 5xx.
    """
    deadline = time.monotonic() + quota_wait
    while True:
        try:
            operation = store.start_import(ctx, uri, store=target, deadline=60.0)
            break
        except store.QuotaExceeded as exc:
            if time.monotonic() > deadline:
                raise TransientError(str(exc)) from exc
            time.sleep(5.0)
    name = str(operation["name"])
    with contextlib.suppress(TransientError):
        operations.record_ours(ctx, name, RESTORE_KIND, subject)
    return name


def wait_operation(
    ctx: Context,
    name: str,
    *,
    poll_seconds: float = 2.0,
    timeout: float | None = None,
    progress: Progress | None = None,
    expected: int | None = None,
) -> JSON:
    """Poll ``name`` until done (or ``timeout``: the last reading, not done)."""
    end = None if timeout is None else time.monotonic() + timeout
    while True:
        op = store.get_operation(ctx, name)
        counter = (op.get("metadata") or {}).get("counter") or {}
        if progress:
            done = int(counter.get("success") or 0) + int(counter.get("failure") or 0)
            progress("import", done, expected)
        if op.get("done") or (end is not None and time.monotonic() > end):
            return op
        time.sleep(poll_seconds)


def for_store(ctx: Context, store: DicomStoreName) -> Context:
    """A context whose DICOMweb client talks to ``store`` (same clients otherwise)."""
    return replace(ctx, settings=replace(ctx.settings, dicom_store=store), _local=threading.local())


def series_sops(ctx: Context, study: str, series: str) -> set[str]:
    """SOP Instance UIDs of one series in ``ctx``'s store: one QIDO per 5,000."""
    client = ctx.dicomweb()
    found: set[str] = set()
    offset = 0
    while True:
        page: list[JSON] = retry.call(
            lambda start=offset: client.search_for_instances(  # type: ignore[misc]
                study_instance_uid=study,
                series_instance_uid=series,
                fields=[verify.SOP_TAG],
                offset=start,
                limit=QIDO_PAGE,
            ),
        )
        found.update(s for item in page if (s := verify._value(item, verify.SOP_TAG)))
        if len(page) < QIDO_PAGE:
            return found
        offset += len(page)


@dataclass
class Check:
    """What the check of a restore found; ``problems`` empty means it passed."""

    studies: int = 0
    series: int = 0
    instances: int = 0
    present: int = 0
    missing: list[str] = field(default_factory=list)
    lost_from_backup: int = 0
    bytes_checked: int = 0
    bytes_different: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def as_dict(self, with_uids: bool) -> JSON:
        out: JSON = {
            "studies": self.studies,
            "series": self.series,
            "instances": self.instances,
            "present": self.present,
            "missing": len(self.missing),
            "lostFromBackup": self.lost_from_backup,
            "bytesChecked": self.bytes_checked,
            "bytesDifferent": len(self.bytes_different),
            "problems": list(self.problems),
        }
        if with_uids:
            out["missingSops"] = sorted(self.missing)[:100]
            out["bytesDifferentSops"] = sorted(self.bytes_different)[:100]
        return out


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check(
    ctx: Context,
    source: Backup,
    target: DicomStoreName,
    studies: list[str],
    verify_bytes: int,
    rng: random.Random,
    progress: Progress | None = None,
) -> Check:
    """Check ``studies`` of ``source`` in ``target``: every instance by QIDO per series,
    each series' count against the manifest, and ``verify_bytes`` sampled instances
    byte for byte."""
    result = Check(studies=len(studies))
    expected = source.by_series(studies)
    result.series = len(expected)
    result.instances = sum(len(s) for s in expected.values())
    # Objects the export wrote that the folder no longer holds (any series, not only the
    # restored ones: a sampled drill still notices a damaged backup).
    listed = source.by_series()
    for series_key, n in source.manifest_series().items():
        study, _, series = series_key.partition("/")
        result.lost_from_backup += max(0, n - len(listed.get((study, series), ())))
    target_ctx = for_store(ctx, target)
    items = sorted(expected)
    done = 0
    lock = threading.Lock()
    if progress:
        progress("check", 0, len(items))

    def one(key: tuple[str, str]) -> set[str]:
        nonlocal done
        found = series_sops(target_ctx, *key)
        with lock:
            done += 1
            if progress:
                progress("check", done, len(items))
        return found

    present: set[str] = set()
    for key, found in zip(items, verify.dicomweb_pmap(target_ctx, one, items), strict=True):
        want = expected[key]
        present |= want & found
        result.missing += sorted(want - found)
    result.present = len(present)
    if result.missing:
        result.problems.append(
            f"{len(result.missing)} of {result.instances} instances are not in the target"
        )
    if result.lost_from_backup:
        result.problems.append(
            f"{result.lost_from_backup} objects the export wrote are missing from the backup"
        )
    chosen = [o for o in source.objects if o.study in set(studies) and o.sop in present]
    sample = rng.sample(chosen, min(verify_bytes, len(chosen))) if verify_bytes > 0 else []
    backups = ctx.storage.bucket(source.bucket)
    if progress:
        progress("bytes", 0, len(sample))
    checked = 0

    def same(item: BackupObject) -> bool:
        nonlocal checked
        original = backups.blob(item.name).download_as_bytes(
            retry=retry.storage(), timeout=retry.DEADLINE
        )
        restored = verify.retrieve_bytes(target_ctx, item.study, item.series, item.sop)
        with lock:
            checked += 1
            if progress:
                progress("bytes", checked, len(sample))
        return _sha256(original) == _sha256(restored)

    try:
        verdicts = verify.dicomweb_pmap(target_ctx, same, sample)
    finally:
        target_ctx.close_clients()
    result.bytes_checked = len(sample)
    result.bytes_different = [o.sop for o, ok in zip(sample, verdicts, strict=True) if not ok]
    if result.bytes_different:
        result.problems.append(
            f"{len(result.bytes_different)} of {len(sample)} sampled instances differ in bytes"
        )
    return result


def operation_problems(op: JSON) -> list[str]:
    """What the import operation itself reports as wrong."""
    problems = []
    if not op.get("done"):
        problems.append("import operation not done")
    error = op.get("error")
    if isinstance(error, dict):
        problems.append(f"import operation failed: code {error.get('code')}")
    failures = int(((op.get("metadata") or {}).get("counter") or {}).get("failure") or 0)
    if failures:
        problems.append(f"import counted {failures} failures")
    return problems


def run(
    ctx: Context,
    day: date,
    target: DicomStoreName,
    *,
    into_live: bool = False,
    wait: bool = True,
    verify_bytes: int = DEFAULT_VERIFY_BYTES,
    previous_keys: Iterable[keys.DeploymentKey] = (),
    progress: Progress | None = None,
    poll_seconds: float = 2.0,
    timeout: float | None = None,
) -> JSON:
    """``dicomflow restore``: import the backup dated ``day`` into ``target`` and check it.

    Tombstoned studies (``erased_studies``) are left out; ``previous_keys`` are keys
    used before a rotation, for tombstones made with them.

    Raises:
        RestoreRefused: see ``load_backup`` and ``check_target``.
        PermanentError, TransientError: the import could not be started or followed.
    """
    started = time.monotonic()
    check_target(ctx, target, into_live)
    source = load_backup(ctx, day)
    every = source.studies()
    if not every:
        raise RestoreRefused(f"the backup dated {day.isoformat()} holds no DICOM objects")
    skipped = erased_studies(ctx, every, previous_keys)
    studies = [s for s in every if s not in skipped]
    rid = restore_id(day)
    result: JSON = {
        "restoreId": rid,
        "date": day.isoformat(),
        "backup": source.uri,
        "target": str(target),
        "manifestComplete": bool(source.manifest.get("complete")),
        "studies": len(studies),
        "studiesSkipped": len(skipped),
    }
    where = {"restoreId": rid, "date": day.isoformat()}
    if not studies:
        result.update(status="nothing", problems=["every study of the backup is erased"])
        return result
    uri = stage_source(ctx, source, studies, rid, progress)
    result["source"] = (
        "copy" if uri.startswith(f"gs://{ctx.settings.staging_bucket}/") else "folder"
    )
    try:
        name = start_import(ctx, target, uri, f"restore/{rid}")
        result["operation"] = name
        logger.info(
            "restore started",
            extra=log.fields(operation=name, studies=len(studies), skipped=len(skipped), **where),
        )
        if not wait:
            result.update(status="started", problems=[])
            return result
        op = wait_operation(
            ctx,
            name,
            poll_seconds=poll_seconds,
            timeout=timeout,
            progress=progress,
            expected=sum(1 for o in source.objects if o.study not in skipped),
        )
    finally:
        if wait and result.get("source") == "copy":
            clean_up(ctx, rid)
    if not op.get("done"):
        result.update(status="timeout", problems=["import still running at the timeout"])
        return result
    problems = operation_problems(op)
    checked = check(ctx, source, target, studies, verify_bytes, random.Random(), progress)
    problems += checked.problems
    result.update(
        status="failed" if problems else "restored",
        check=checked.as_dict(with_uids=True),
        problems=problems,
        seconds=round(time.monotonic() - started, 1),
    )
    logger.log(
        logging.ERROR if problems else logging.INFO,
        "restore failed" if problems else "restore checked",
        extra=log.fields(
            operation=name,
            instances=checked.instances,
            present=checked.present,
            bytesChecked=checked.bytes_checked,
            problems=problems,
            **where,
        ),
    )
    return result
