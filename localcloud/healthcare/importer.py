"""Storing instances (shared by import and STOW-RS) and the import operation.

An import lists the source, then has a pool of worker processes (``fetch``)
read and parse the files in chunks while this process decides and indexes the
finished chunks in source order: bytes and index rows of a chunk go in one
SQLite transaction (WAL, no fsync per instance). The bytes are stored as
received. Decisions per file:

- new UIDs: stored;
- same UIDs, same bytes: ignored, counted as success;
- same UIDs, other bytes: failure, checksum mismatch;
- not DICOM, truncated, UIDs missing or invalid: failure.

Newly stored instances are announced on the store's Pub/Sub notification
topics (``notifications``) before the chunk counts as done.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from localcloud.healthcare.fetch import Candidate, FetchPool, WorkerDied
from localcloud.healthcare.gcs import StorageAccess
from localcloud.healthcare.instances import CHECKSUM_MISMATCH, ParsedInstance
from localcloud.healthcare.notifications import IMPORT_ACTION, Notifier
from localcloud.healthcare.operations import RunningOperation, now_rfc3339
from localcloud.healthcare.repository import Repository
from localcloud.healthcare.status import ApiError
from localcloud.healthcare.wildcards import parse_gcs_source

CHUNK = 250
_OTHER_SERIES = (
    "An instance with this SOPInstanceUID already exists in this DICOM Store under a "
    "different study or series"
)


@dataclass(frozen=True)
class FileOutcome:
    """What happened to one file."""

    source: str
    stored: bool
    duplicate: bool = False
    parsed: ParsedInstance | None = None
    code: int = 0
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.stored or self.duplicate


class InstanceWriter:
    """Decides and stores files for every store; one writer at a time per store."""

    def __init__(self, repository: Repository, notifier: Notifier) -> None:
        self._repository = repository
        self._notifier = notifier
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _lock_for(self, store: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(store, threading.Lock())

    def store(self, store: str, candidates: Sequence[Candidate], action: str) -> list[FileOutcome]:
        """Store a chunk of examined files in order; one transaction for the new ones.

        ``action`` is the notification's (``StoreInstances`` or ``ImportDicomData``).
        """
        outcomes: list[FileOutcome] = []
        new_rows: list[tuple[ParsedInstance, str, bytes]] = []
        with self._lock_for(store):
            known = self._repository.find_instances(
                store, [c.parsed.sop_uid for c in candidates if c.parsed is not None]
            )
            for item in candidates:
                parsed = item.parsed
                if parsed is None:
                    code, message = item.error or (3, "not a DICOM file")
                    outcomes.append(FileOutcome(item.source, False, code=code, message=message))
                    continue
                existing = known.get(parsed.sop_uid)
                if existing is None:
                    new_rows.append((parsed, item.sha256, item.data))
                    known[parsed.sop_uid] = (parsed.study_uid, parsed.series_uid, item.sha256)
                    outcomes.append(FileOutcome(item.source, True, parsed=parsed))
                elif existing == (parsed.study_uid, parsed.series_uid, item.sha256):
                    outcomes.append(FileOutcome(item.source, False, True, parsed=parsed))
                else:
                    same_place = existing[:2] == (parsed.study_uid, parsed.series_uid)
                    message = CHECKSUM_MISMATCH if same_place else _OTHER_SERIES
                    outcomes.append(
                        FileOutcome(item.source, False, parsed=parsed, code=6, message=message)
                    )
            if new_rows:
                self._repository.add_instances(store, new_rows)
        if new_rows:
            try:
                resource = self._repository.get_store(store)
            except ApiError:
                return outcomes  # deleted meanwhile: nobody to notify for
            self._notifier.notify(resource, [p for p, _, _ in new_rows], action, now_rfc3339())
        return outcomes


def run_import(
    operation: RunningOperation,
    store: str,
    source_uri: str,
    storage: StorageAccess,
    pool: FetchPool,
    writer: InstanceWriter,
    checkpoint: Callable[[RunningOperation], None],
) -> dict[str, Any] | None:
    """The body of a dicomStores.import operation.

    Raises:
        ApiError: the bucket is missing, nothing matches the URI, or a worker died.
    """
    try:
        pattern = parse_gcs_source(source_uri)
    except ValueError as exc:
        raise ApiError("INVALID_ARGUMENT", str(exc)) from None
    sources = sorted(
        s
        for s in storage.list_objects(pattern.bucket, pattern.prefix)
        if not s[0].endswith("/") and pattern.matches(s[0])
    )
    if not sources:
        raise ApiError("NOT_FOUND", f"no Cloud Storage objects match {source_uri}")
    operation.set_pending(len(sources))
    checkpoint(operation)

    chunks = [sources[start : start + CHUNK] for start in range(0, len(sources), CHUNK)]
    # Keep every worker busy while this thread stores the chunk that finished first.
    window = max(2, 2 * pool.workers)
    pending: deque[Future[list[Candidate]]] = deque()
    submitted = 0
    try:
        while submitted < len(chunks) or pending:
            while submitted < len(chunks) and len(pending) < window:
                request = (storage.endpoint, storage.root, pattern.bucket, chunks[submitted])
                pending.append(pool.submit(request))
                submitted += 1
            if operation.cancelled.is_set():
                break
            try:
                candidates = pending.popleft().result()
            except WorkerDied as exc:
                raise ApiError(
                    "INTERNAL", f"an import worker of the emulator died: {exc}"
                ) from None
            outcomes = writer.store(store, candidates, IMPORT_ACTION)
            for outcome in outcomes:
                if not outcome.ok:
                    operation.log_failure(outcome.source, outcome.code, outcome.message)
            ok = sum(1 for o in outcomes if o.ok)
            operation.count(success=ok, failure=len(outcomes) - ok)
            checkpoint(operation)
    finally:
        for future in pending:
            future.cancel()
    return None
