"""Per-file verification of a finished import batch against the store, order-free.

``take_note`` reads, before an import, which SOP Instance UIDs the store already
holds; ``verify_batch`` gives every file of a finished batch one outcome (``imported``,
``duplicate``, ``conflict`` or ``failed``) from QIDO per study, comparing bytes only
where the operation's counters, or their absence, call for it.

See docs/architecture.md#verification
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import google_crc32c
import requests

from dicomflow import retry
from dicomflow.clock import iso
from dicomflow.json_types import JSON
from dicomflow.runtime import Context
from dicomflow.staging import BATCH_STATE_PREFIX, FileRecord, staged_name

logger = logging.getLogger(__name__)

THREADS = 16
# DICOMweb calls at once (QIDO per study or per SOP, WADO): a few, not to crowd the store.
DICOMWEB_THREADS = 4
# WADO-RS of one instance, as stored: single-part, no transcoding.
RETRIEVE_ACCEPT = "application/dicom; transfer-syntax=*"
# Seconds per connect and per read, as dicomweb-client's own requests.
RETRIEVE_TIMEOUT = 20
SERIES_TAG = "0020000E"
STUDY_TAG = "0020000D"
SOP_TAG = "00080018"

IMPORTED, DUPLICATE, CONFLICT, FAILED = "imported", "duplicate", "conflict", "failed"
SUCCESS = frozenset({IMPORTED, DUPLICATE})
OUTCOMES = (IMPORTED, DUPLICATE, CONFLICT, FAILED)

NOT_IN_STORE = "not-in-store"
CHECKSUM_MISMATCH = "checksum-mismatch"
OTHER_STUDY_OR_SERIES = "sop-uid-in-other-study-or-series"
NO_UIDS = "no-uids"

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class FileResult:
    """The verdict for one file of the batch."""

    record: FileRecord
    status: str = FAILED
    reason: str | None = None
    stored_checksum: str | None = None
    fetched: bool = False

    @property
    def key(self) -> str:
        return self.record.key

    def line(self, batch: str, operation: str | None) -> JSON:
        """The manifest line (``success.ndjson`` or ``failure.ndjson``)."""
        out: JSON = {
            **self.record.line(),
            "status": self.status,
            "batch": batch,
            "operation": operation,
            "staged": staged_name(self.record.window, self.record.key),
        }
        if self.reason:
            out["reason"] = self.reason
        checksum = self.record.checksum
        if checksum:
            out["checksum"] = checksum
        if self.stored_checksum and self.stored_checksum != checksum:
            out["storedChecksum"] = self.stored_checksum
        return out


def note_name(batch: str) -> str:
    """Which of the batch's SOP Instance UIDs the store held before its import."""
    return f"{BATCH_STATE_PREFIX}{batch}/note.json"


# --- pure parts -------------------------------------------------------------------------------


def checksum_of(data: bytes, scheme: str) -> str:
    """The checksum of ``data`` in ``scheme`` (``md5`` or ``crc32c``), as GCS encodes it."""
    if scheme == "md5":
        digest = hashlib.md5(data, usedforsecurity=False).digest()
    else:
        digest = google_crc32c.Checksum(data).digest()  # type: ignore[no-untyped-call]
    return f"{scheme}:{base64.b64encode(digest).decode('ascii')}"


def failures_counted(operation: JSON | None) -> int | None:
    """The operation's ``counter.failure``, or None when there is none to rely on (no
    operation, or no counters: it was lost or failed as a whole). An import with
    per-file failures ends with an error and its counters; the counters count."""
    counter = (operation or {}).get("counter")
    if not isinstance(counter, dict) or not counter:
        return None
    try:
        return int(counter.get("failure") or 0)
    except (TypeError, ValueError):
        return None


def suspects(results: Iterable[FileResult], before: set[str]) -> set[str]:
    """SOP UIDs whose stored bytes may be another file's: stored before the import, or
    carried by two files of the batch with different checksums."""
    checksums: dict[str, set[str | None]] = defaultdict(set)
    for result in results:
        if result.record.sop:
            checksums[result.record.sop].add(result.record.checksum)
    return {sop for sop, sums in checksums.items() if sop in before or len(sums) > 1}


def name_successes(
    present: list[FileResult],
    before: set[str],
    earlier: set[tuple[str, str | None]] = frozenset(),  # type: ignore[assignment]
) -> None:
    """``imported`` or ``duplicate`` for each present file shown (or taken) to be stored
    with its own bytes. Pure; results in key order."""
    seen: set[str] = set()
    for result in sorted(present, key=lambda r: r.key):
        if result.status == CONFLICT:
            continue
        sop = result.record.sop or ""
        again = sop in before or sop in seen or (sop, result.record.checksum) in earlier
        result.status = DUPLICATE if again else IMPORTED
        result.reason = None
        seen.add(sop)


# --- store access -----------------------------------------------------------------------------


def _value(item: JSON, tag: str) -> str | None:
    values = (item.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else None


def search_study(ctx: Context, study: str) -> dict[str, tuple[str, str]]:
    """SOP UID -> (study, series) of every instance of ``study`` in the store."""
    client = ctx.dicomweb()
    found: dict[str, tuple[str, str]] = {}
    offset = 0
    while True:
        page: list[JSON] = retry.call(
            lambda offset=offset: client.search_for_instances(  # type: ignore[misc]
                study_instance_uid=study, fields=[SERIES_TAG], offset=offset, limit=5000
            ),
        )
        for item in page:
            sop, series = _value(item, SOP_TAG), _value(item, SERIES_TAG)
            if sop and series:
                found[sop] = (study, series)
        if len(page) < 5000:
            return found
        offset += len(page)


def search_sop(ctx: Context, sop: str) -> tuple[str, str] | None:
    """(study, series) of ``sop`` anywhere in the store, or None."""
    client = ctx.dicomweb()
    items: list[JSON] = retry.call(
        lambda: client.search_for_instances(
            fields=[STUDY_TAG, SERIES_TAG], search_filters={"SOPInstanceUID": sop}, limit=10
        ),
    )
    for item in items:
        study, series = _value(item, STUDY_TAG), _value(item, SERIES_TAG)
        if study and series and _value(item, SOP_TAG) in (None, sop):
            return study, series
    return None


def retrieve_bytes(ctx: Context, study: str, series: str, sop: str) -> bytes:
    """The stored instance as it was imported (WADO-RS with ``transfer-syntax=*``).

    dicomweb-client's ``retrieve_instance`` parses into a pydicom Dataset, which
    re-encodes on save. A single-part ``application/dicom`` request (which the
    Healthcare API's RetrieveInstance accepts) on the client's session gives the
    bytes as stored.
    """
    session = ctx.dicomweb_session()
    url = f"{ctx.dicomweb_url()}/studies/{study}/series/{series}/instances/{sop}"

    def fetch() -> bytes:
        response = session.get(url, headers={"Accept": RETRIEVE_ACCEPT}, timeout=RETRIEVE_TIMEOUT)
        response.raise_for_status()
        content_type = response.headers.get("Content-Type", "")
        if not content_type.startswith("application/dicom"):
            raise ValueError(f"WADO-RS of one instance answered {content_type or 'no type'}")
        return bytes(response.content)

    data: bytes = retry.call(fetch)
    return data


def dicomweb_pmap(ctx: Context, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``fn`` over ``items`` in a pool of ``DICOMWEB_THREADS``, for DICOMweb calls.

    ``ctx.dicomweb()`` is per thread; the clients the pool threads made are closed
    at the end, so no connection outlives the pool.
    """
    items = list(items)
    if len(items) <= 1:
        return [fn(i) for i in items]
    made: dict[int, requests.Session] = {}
    lock = threading.Lock()

    def run(item: T) -> R:
        session = ctx.dicomweb_session()
        with lock:
            made[id(session)] = session
        return fn(item)

    try:
        with ThreadPoolExecutor(
            min(DICOMWEB_THREADS, len(items)), thread_name_prefix="dicomweb"
        ) as pool:
            return list(pool.map(run, items))
    finally:
        for session in made.values():
            session.close()


def _stored(ctx: Context, records: Iterable[FileRecord]) -> dict[str, tuple[str, str]]:
    studies = sorted({r.study for r in records if r.study})
    found: dict[str, tuple[str, str]] = {}
    for part in dicomweb_pmap(ctx, lambda study: search_study(ctx, study), studies):
        found.update(part)
    return found


def take_note(ctx: Context, records: list[FileRecord], others: list[str]) -> JSON:
    """Which of ``records``' SOP Instance UIDs the store holds now (before the import), and
    the other batches not verified yet (``others``), whose imports may overlap this one."""
    mine = {r.sop for r in records if r.sop}
    stored = _stored(ctx, records)
    return {
        "sops": sorted(mine & stored.keys()),
        "open": sorted(others),
        "studies": len({r.study for r in records if r.study}),
        "takenAt": iso(ctx.clock()),
    }


def earlier_copies(
    read_records: Callable[[str], list[FileRecord]],
    read_note: Callable[[str], JSON | None],
    batch: str,
    note: JSON | None,
) -> set[tuple[str, str | None]]:
    """(SOP UID, checksum) of files that an earlier batch, open when ``batch`` took its note,
    counts as ``imported``: the earliest of several imports of identical bytes is the one
    that imported them, whichever happened to store them first.

    An earlier batch counts a file as imported unless its own note saw the UID stored;
    one that has not taken its note yet will see it stored (this batch is done), so its
    files do not count.
    """
    found: set[tuple[str, str | None]] = set()
    for other in (note or {}).get("open") or []:
        if other >= batch:
            continue
        theirs = read_note(other)
        if theirs is None:
            continue
        seen = set(theirs.get("sops") or [])
        found.update(
            (r.sop, r.checksum) for r in read_records(other) if r.sop and r.sop not in seen
        )
    return found


# --- the verification ------------------------------------------------------------------------


def verify_batch(
    ctx: Context,
    records: list[FileRecord],
    operation: JSON | None,
    note: JSON | None,
    earlier: set[tuple[str, str | None]] = frozenset(),  # type: ignore[assignment]
) -> list[FileResult]:
    """Decide the outcome of every file of a finished batch (docs/architecture.md#verification).

    ``earlier``: ``earlier_copies`` of the batch."""
    results = [FileResult(r) for r in sorted(records, key=lambda r: r.key)]
    checkable = [r for r in results if r.record.sop and r.record.study and r.record.series]
    for result in results:
        if result not in checkable:
            result.reason = NO_UIDS
    found = _stored(ctx, (r.record for r in checkable))
    seen_studies = {study for study, _ in found.values()}
    present: list[FileResult] = []
    lookups: list[FileResult] = []
    for result in checkable:
        rec = result.record
        where = found.get(rec.sop or "")
        if where is None:
            if rec.study in seen_studies:
                lookups.append(result)
            else:
                result.reason = NOT_IN_STORE  # the study is absent as a whole
        elif where != (rec.study, rec.series):
            result.status, result.reason = CONFLICT, OTHER_STUDY_OR_SERIES
        else:
            present.append(result)

    def lookup(result: FileResult) -> tuple[str, str] | None:
        return search_sop(ctx, result.record.sop or "")

    for result, where in zip(lookups, dicomweb_pmap(ctx, lookup, lookups), strict=True):
        if where is not None:
            result.status, result.reason = CONFLICT, OTHER_STUDY_OR_SERIES
        else:
            result.reason = NOT_IN_STORE

    before = set((note or {}).get("sops") or [])
    counted = failures_counted(operation)
    unexplained = None if counted is None else counted - (len(results) - len(present))
    if unexplained is None or unexplained > 0:
        _compare(ctx, present, before, unexplained)
    name_successes(present, before, earlier)
    return results


def _compare(
    ctx: Context, present: list[FileResult], before: set[str], unexplained: int | None
) -> None:
    """Compare stored bytes with each file's, suspects first, until ``unexplained``
    conflicts are found (all of them when None)."""
    suspect = suspects(present, before)
    by_sop: dict[str, list[FileResult]] = defaultdict(list)
    for result in present:
        by_sop[result.record.sop or ""].append(result)
    rest = sorted(sop for sop in by_sop if sop not in suspect)
    # The suspects first, then the rest in rounds of a few, so that a batch whose counted
    # failures are all found among the suspects fetches nothing more.
    step = DICOMWEB_THREADS * 2
    rounds = [sorted(suspect & by_sop.keys())] + [
        rest[i : i + step] for i in range(0, len(rest), step)
    ]
    found = 0
    lock = threading.Lock()

    def compare(sop: str) -> None:
        nonlocal found
        group = by_sop[sop]
        rec = group[0].record
        data = retrieve_bytes(ctx, rec.study or "", rec.series or "", sop)
        for result in group:
            scheme = (result.record.checksum or "md5:").split(":", 1)[0]
            result.stored_checksum = checksum_of(data, scheme)
            result.fetched = True
            if result.record.checksum is None or result.stored_checksum != result.record.checksum:
                result.status, result.reason = CONFLICT, CHECKSUM_MISMATCH
                with lock:
                    found += 1

    for sops in rounds:
        if unexplained is not None and found >= unexplained:
            return
        dicomweb_pmap(ctx, compare, sops)


def counts(results: Iterable[FileResult]) -> dict[str, int]:
    """Files per outcome, every outcome present."""
    out = dict.fromkeys(OUTCOMES, 0)
    for result in results:
        out[result.status] += 1
    return out
