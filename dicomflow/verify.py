"""Per-file verification of a finished import batch against the store (DESIGN invariant 5).

The operation's counters are not trusted: every file listed in the batch's
``_files.json`` is looked up in the store, one QIDO search per study (not per
instance), and gets exactly one outcome:

- ``imported``: the store holds the instance and its bytes are this file's,
  and no file settled by dicomflow put them there before.
- ``duplicate``: the store holds this file's bytes, and dicomflow had already
  settled another file with the same SOP Instance UID and the same checksum
  (a re-sent file, in an earlier batch or twice in this one).
- ``conflict``: the SOP Instance UID is in the store with other bytes (checksum
  mismatch), or under another study or series.
- ``failed``: the instance is not in the store (reason ``not-in-store``), or the
  ledger has no entry or no UIDs for the file.

How "already there" is known. Neither the service nor QIDO says when an
instance was stored, so dicomflow keeps its own index of settled instances:
``state/instances/<sha256(SOP UID)[:40]>.json`` holding ``{sop, checksum, key,
batch}``. It is created (create-if-absent) by the first file settled for that
UID; the ledger key in it makes a re-run after a crash reach the same verdict.
The checksum is the source's ``md5Hash`` from the ledger (``crc32c`` when the
object has no MD5, e.g. composite uploads), written ``md5:<base64>``.

When the bytes are fetched (WADO-RS, ``transfer-syntax=*``, which returns the
stored file as it was imported): only for an instance that is ambiguous, i.e.

- the index names another file with a *different* checksum, or
- two files of this batch carry the same SOP Instance UID with different checksums.

In every other case the verdict needs no download: a healthy batch costs one
QIDO per study and one small index write per file.

A file missing from its study costs one QIDO by SOP Instance UID (is it stored
under another study or series: conflict), except when the study search found no
instance of that study at all (the study failed as a whole, the common case of a
failed import): then only the index is read, and a lookup is made only for a SOP
UID the index places in another study or series. So a failed 5,000-file batch
costs a few QIDO calls, not 5,000. DICOMweb calls (study searches, SOP lookups,
WADO fetches) run ``DICOMWEB_THREADS`` at a time.

Known limits: a SOP UID stored *outside* dicomflow under another study, whose own
study is absent, is reported ``failed`` (``not-in-store``) rather than ``conflict``;
both are failures and alert. There is no time budget inside one batch: a tick
verifies a batch whole (the report stops starting batches after its budget), and a
crash or timeout repeats the batch's verification from the start.

Known limit: the index decides without bytes only if batches settle in the order
they were imported. Two files with one SOP UID and different bytes, in two batches
verified at the same time (two report instances) or out of import order, can both
be ``imported`` when the later batch claims the index first. One tick verifies a
few batches at once, but each waits for the batches before it to be done with the
index (``my_turn``), so within a tick the index is used in batch order.

Known limit: an instance stored *outside* dicomflow (STOW-RS, a manual import)
with the same UIDs and different bytes is not in the index. If the import's
own failure report also missed that file, it is reported ``imported``.
Identical instances stored outside dicomflow are reported ``imported``, not
``duplicate``; both are successes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import google_crc32c
import requests
from google.api_core import exceptions as gexc
from google.cloud import storage

from dicomflow import batches, ledger, retry
from dicomflow.config import STATE_PREFIX
from dicomflow.export import qido_instances
from dicomflow.ledger import Entry

logger = logging.getLogger(__name__)

INDEX_PREFIX = f"{STATE_PREFIX}instances/"
THREADS = 16
# DICOMweb calls at once (QIDO per study or per SOP, WADO): a few, not to crowd the store.
DICOMWEB_THREADS = 4
SERIES_TAG = "0020000E"
STUDY_TAG = "0020000D"
SOP_TAG = "00080018"

IMPORTED, DUPLICATE, CONFLICT, FAILED = (
    ledger.IMPORTED,
    ledger.DUPLICATE,
    ledger.CONFLICT,
    ledger.FAILED,
)
SUCCESS = frozenset({IMPORTED, DUPLICATE})
OUTCOMES = (IMPORTED, DUPLICATE, CONFLICT, FAILED)

NOT_IN_STORE = "not-in-store"
CHECKSUM_MISMATCH = "checksum-mismatch"
OTHER_STUDY_OR_SERIES = "sop-uid-in-other-study-or-series"
NO_ENTRY = "no-ledger-entry"
NO_UIDS = "no-uids-in-ledger"

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class FileResult:
    """The verdict for one file of the batch."""

    key: str
    entry: Entry | None
    status: str = FAILED
    reason: str | None = None
    checksum: str | None = None
    stored_checksum: str | None = None
    fetched: bool = False
    generation: int | None = None

    def line(self, batch: str, operation: str | None) -> dict[str, Any]:
        """The manifest line (``success.ndjson`` or ``failure.ndjson``)."""
        out: dict[str, Any] = {
            "key": self.key,
            "status": self.status,
            "batch": batch,
            "operation": operation,
            "ledger": ledger.entry_path(self.key),
            "staged": batches.staged_name(batch, self.key),
        }
        if self.reason:
            out["reason"] = self.reason
        if self.entry is not None:
            src = self.entry.source
            out["source"] = {
                "uri": src.uri,
                "generation": src.generation,
                "size": src.size,
                "md5Hash": src.md5Hash,
                "crc32c": src.crc32c,
            }
            if self.entry.uids is not None:
                out["study"] = self.entry.uids.study
                out["series"] = self.entry.uids.series
                out["sop"] = self.entry.uids.sop
        if self.checksum:
            out["checksum"] = self.checksum
        if self.stored_checksum and self.stored_checksum != self.checksum:
            out["storedChecksum"] = self.stored_checksum
        return out


@dataclass
class StoreFacts:
    """What the store holds, as far as verification asked: SOP UID -> (study, series)."""

    found: dict[str, tuple[str, str]] = field(default_factory=dict)


# --- pure parts -------------------------------------------------------------------------------


def entry_checksum(entry: Entry) -> str | None:
    """``md5:<b64>`` from the ledger's source, else ``crc32c:<b64>``, else None."""
    if entry.source.md5Hash:
        return f"md5:{entry.source.md5Hash}"
    if entry.source.crc32c:
        return f"crc32c:{entry.source.crc32c}"
    return None


def checksum_of(data: bytes, scheme: str) -> str:
    """The checksum of ``data`` in ``scheme`` (``md5`` or ``crc32c``), as GCS encodes it."""
    if scheme == "md5":
        digest = hashlib.md5(data, usedforsecurity=False).digest()
    else:
        digest = google_crc32c.Checksum(data).digest()  # type: ignore[no-untyped-call]
    return f"{scheme}:{base64.b64encode(digest).decode('ascii')}"


def index_name(sop: str) -> str:
    """The index object of a SOP Instance UID."""
    return f"{INDEX_PREFIX}{hashlib.sha256(sop.encode()).hexdigest()[:40]}.json"


def ambiguous_in_batch(results: Iterable[FileResult]) -> set[str]:
    """Keys of files sharing a SOP Instance UID with a file of different checksum."""
    by_sop: dict[str, list[FileResult]] = defaultdict(list)
    for result in results:
        if result.entry is not None and result.entry.uids is not None:
            by_sop[result.entry.uids.sop].append(result)
    keys: set[str] = set()
    for group in by_sop.values():
        if len({r.checksum for r in group}) > 1:
            keys.update(r.key for r in group)
    return keys


def decide_without_bytes(
    key: str, checksum: str | None, index: dict[str, Any] | None
) -> str | None:
    """The outcome of a stored instance from the index alone, or None when bytes are needed.

    ``index`` is the instance's index entry after our create-if-absent attempt.
    """
    if index is None or index.get("key") == key:
        return IMPORTED
    if checksum is not None and index.get("checksum") == checksum:
        return DUPLICATE
    return None


def decide_with_bytes(
    key: str, checksum: str | None, stored: str | None, index: dict[str, Any] | None
) -> str:
    """The outcome once the stored instance's checksum is known."""
    if checksum is None or stored != checksum:
        return CONFLICT
    if index is not None and index.get("key") != key and index.get("checksum") == checksum:
        return DUPLICATE
    return IMPORTED


# --- store and storage access ---------------------------------------------------------------


def _http_status(exc: BaseException) -> int | None:
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return int(exc.response.status_code)
    return retry.status_of(exc)


def transient(exc: BaseException) -> bool:
    """429, 5xx and connection errors from DICOMweb or the APIs."""
    status = _http_status(exc)
    if status is not None:
        return status in (408, 429) or status >= 500
    return retry.should_retry(exc)


def _value(item: dict[str, Any], tag: str) -> str | None:
    values = (item.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else None


def search_study(ctx: Any, study: str) -> dict[str, tuple[str, str]]:
    """SOP UID -> (study, series) of every instance of ``study`` in the store."""
    found: dict[str, tuple[str, str]] = {}
    for item in qido_instances(ctx, [SERIES_TAG], study=study):
        sop, series = _value(item, SOP_TAG), _value(item, SERIES_TAG)
        if sop and series:
            found[sop] = (study, series)
    return found


def search_sop(ctx: Any, sop: str) -> tuple[str, str] | None:
    """(study, series) of ``sop`` anywhere in the store, or None."""
    client = ctx.dicomweb()
    items: list[dict[str, Any]] = retry.call(
        lambda: client.search_for_instances(
            fields=[STUDY_TAG, SERIES_TAG], search_filters={"SOPInstanceUID": sop}, limit=10
        ),
        predicate=transient,
    )
    for item in items:
        study, series = _value(item, STUDY_TAG), _value(item, SERIES_TAG)
        if study and series and _value(item, SOP_TAG) in (None, sop):
            return study, series
    return None


def retrieve_bytes(ctx: Any, study: str, series: str, sop: str) -> bytes:
    """The stored instance as it was imported (WADO-RS with ``transfer-syntax=*``).

    dicomweb-client's ``retrieve_instance`` parses into a pydicom Dataset, which
    re-encodes on save; its request and multipart helpers give the bytes as sent.
    """
    from dicomweb_client.web import _Transaction

    client = ctx.dicomweb()
    url = client._get_instances_url(_Transaction.RETRIEVE, study, series, sop)
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'

    def fetch() -> bytes:
        response = client._http_get(url, headers={"Accept": accept})
        if response.headers.get("Content-Type", "").startswith("application/dicom"):
            return bytes(response.content)
        parts = list(client._decode_multipart_message(response, stream=False))
        if len(parts) != 1:
            raise ValueError(f"WADO-RS of one instance returned {len(parts)} parts")
        return bytes(parts[0])

    data: bytes = retry.call(fetch, predicate=transient)
    return data


def read_index(bucket: storage.Bucket, sop: str) -> tuple[dict[str, Any], int] | None:
    blob = bucket.blob(index_name(sop))
    try:
        raw = retry.call(blob.download_as_bytes)
    except gexc.NotFound:
        return None
    return json.loads(raw), int(blob.generation or 0)


def claim_index(bucket: storage.Bucket, doc: dict[str, Any]) -> dict[str, Any] | None:
    """Create the SOP's index entry; None when we created it, else the existing entry."""
    while True:
        if batches.create_json(bucket, index_name(doc["sop"]), doc):
            return None
        found = read_index(bucket, doc["sop"])
        if found is not None:
            return found[0]


def replace_index(bucket: storage.Bucket, doc: dict[str, Any]) -> None:
    """Point the SOP's index at ``doc`` (the store was shown to hold its bytes)."""
    blob = bucket.blob(index_name(doc["sop"]))
    body = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    for _ in range(10):
        found = read_index(bucket, doc["sop"])
        generation = 0 if found is None else found[1]
        try:
            retry.call(
                lambda g=generation: blob.upload_from_string(  # type: ignore[misc]
                    body, content_type="application/json", if_generation_match=g
                )
            )
            return
        except gexc.PreconditionFailed:
            continue


def pmap(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``fn`` over ``items`` in a small thread pool, results in order."""
    items = list(items)
    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(min(THREADS, len(items)), thread_name_prefix="verify") as pool:
        return list(pool.map(fn, items))


def dicomweb_pmap(ctx: Any, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``fn`` over ``items`` in a pool of ``DICOMWEB_THREADS``, for DICOMweb calls.

    ``ctx.dicomweb()`` is per thread; the clients the pool threads made are closed
    at the end, so no connection outlives the pool.
    """
    items = list(items)
    if len(items) <= 1:
        return [fn(i) for i in items]
    made: dict[int, Any] = {}
    lock = threading.Lock()

    def run(item: T) -> R:
        client = ctx.dicomweb()
        with lock:
            made[id(client)] = client
        return fn(item)

    try:
        with ThreadPoolExecutor(
            min(DICOMWEB_THREADS, len(items)), thread_name_prefix="dicomweb"
        ) as pool:
            return list(pool.map(run, items))
    finally:
        for client in made.values():
            session = getattr(client, "_session", None)
            if session is not None:
                session.close()


# --- the verification ------------------------------------------------------------------------


def verify_batch(
    ctx: Any, batch: str, keys: list[str], *, my_turn: Callable[[], None] = lambda: None
) -> list[FileResult]:
    """Decide the outcome of every file ``key`` of ``batch`` (sorted by key).

    ``my_turn`` is called once the ledger and the store have been read, before the
    first look at the index; it returns when earlier batches are done with the index
    (see the known limit on order above).
    """
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    keys = sorted(keys)

    def load(key: str) -> FileResult:
        found = ledger.read(bucket, key)
        entry = found[0] if found else None
        result = FileResult(key, entry, generation=found[1] if found else None)
        if entry is None:
            result.reason = NO_ENTRY
        elif entry.uids is None:
            result.reason = NO_UIDS
        else:
            result.checksum = entry_checksum(entry) or _staged_checksum(bucket, batch, key)
        return result

    results = pmap(load, keys)
    checkable = [r for r in results if r.entry is not None and r.entry.uids is not None]
    studies = sorted({r.entry.uids.study for r in checkable})  # type: ignore[union-attr]
    facts = StoreFacts()
    for found in dicomweb_pmap(ctx, lambda study: search_study(ctx, study), studies):
        facts.found.update(found)
    seen_studies = {study for study, _ in facts.found.values()}

    present: list[FileResult] = []
    lookups: list[FileResult] = []
    absent: list[FileResult] = []
    for result in checkable:
        uids = result.entry.uids  # type: ignore[union-attr]
        assert uids is not None
        where = facts.found.get(uids.sop)
        if where is None:
            # Missing from its study. A study with no instance at all failed as a whole
            # (the common case of a failed import): no lookup per file, only the index.
            (lookups if uids.study in seen_studies else absent).append(result)
        elif where != (uids.study, uids.series):
            result.status, result.reason = CONFLICT, OTHER_STUDY_OR_SERIES
        else:
            present.append(result)

    def indexed_elsewhere(result: FileResult) -> bool:
        uids = result.entry.uids  # type: ignore[union-attr]
        assert uids is not None
        found = read_index(bucket, uids.sop)
        return found is not None and (found[0].get("study"), found[0].get("series")) != (
            uids.study,
            uids.series,
        )

    my_turn()
    # dicomflow stored this SOP UID under another study before: worth one lookup.
    lookups += [r for r, hit in zip(absent, pmap(indexed_elsewhere, absent), strict=True) if hit]
    for result in absent:
        result.status, result.reason = FAILED, NOT_IN_STORE

    def lookup(result: FileResult) -> tuple[str, str] | None:
        uids = result.entry.uids  # type: ignore[union-attr]
        assert uids is not None
        return search_sop(ctx, uids.sop)

    for result, where in zip(lookups, dicomweb_pmap(ctx, lookup, lookups), strict=True):
        # Not in its study: conflict if the SOP UID sits elsewhere, else not stored.
        if where is not None:
            result.status, result.reason = CONFLICT, OTHER_STUDY_OR_SERIES
        else:
            result.status, result.reason = FAILED, NOT_IN_STORE

    ambiguous = ambiguous_in_batch(present)

    def index_doc(result: FileResult) -> dict[str, Any]:
        entry = result.entry
        assert entry is not None and entry.uids is not None
        return {
            "sop": entry.uids.sop,
            "study": entry.uids.study,
            "series": entry.uids.series,
            "checksum": result.checksum,
            "key": result.key,
            "batch": batch,
        }

    def consult(result: FileResult) -> dict[str, Any] | None:
        """The index entry after our claim (None: ours is new); decides when it can."""
        doc = index_doc(result)
        if result.key in ambiguous:
            found = read_index(bucket, doc["sop"])
            return found[0] if found else None
        index = claim_index(bucket, doc)
        verdict = decide_without_bytes(result.key, result.checksum, index)
        if verdict is not None:
            result.status, result.reason = verdict, None
        return index

    indexes = pmap(consult, present)
    to_fetch = [
        (result, index)
        for result, index in zip(present, indexes, strict=True)
        if not (result.key not in ambiguous and result.reason is None and result.status in SUCCESS)
    ]  # the others were decided from the index alone

    def compare(item: tuple[FileResult, dict[str, Any] | None]) -> None:
        result, index = item
        uids = result.entry.uids  # type: ignore[union-attr]
        assert uids is not None
        data = retrieve_bytes(ctx, uids.study, uids.series, uids.sop)
        scheme = (result.checksum or "md5:").split(":", 1)[0]
        result.stored_checksum = checksum_of(data, scheme)
        result.fetched = True
        verdict = decide_with_bytes(result.key, result.checksum, result.stored_checksum, index)
        result.status = verdict
        result.reason = CHECKSUM_MISMATCH if verdict == CONFLICT else None
        if verdict == IMPORTED and (index is None or index.get("key") != result.key):
            replace_index(bucket, index_doc(result))

    dicomweb_pmap(ctx, compare, to_fetch)
    return results


def _staged_checksum(bucket: storage.Bucket, batch: str, key: str) -> str | None:
    """The staging copy's checksum, for ledger entries without one."""
    blob = bucket.get_blob(batches.staged_name(batch, key))
    if blob is None:
        return None
    if blob.md5_hash:
        return f"md5:{blob.md5_hash}"
    return f"crc32c:{blob.crc32c}" if blob.crc32c else None


def counts(results: Iterable[FileResult]) -> dict[str, int]:
    """Files per outcome, every outcome present."""
    out = dict.fromkeys(OUTCOMES, 0)
    for result in results:
        out[result.status] += 1
    return out
