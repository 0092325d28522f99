"""Storing instances (shared by import and STOW-RS) and the import operation.

Files are fetched and parsed in a small thread pool, then decided and indexed
in source order, one SQLite transaction per chunk. The bytes are stored as
received. Decisions per file:

- new UIDs: stored;
- same UIDs, same bytes: ignored, counted as success;
- same UIDs, other bytes: failure, checksum mismatch;
- not DICOM, truncated, or UIDs missing: failure.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from localcloud.healthcare.gcs import StorageAccess
from localcloud.healthcare.instances import (
    CHECKSUM_MISMATCH,
    InstanceRejected,
    ParsedInstance,
    parse_instance,
)
from localcloud.healthcare.operations import RunningOperation
from localcloud.healthcare.repository import Repository
from localcloud.healthcare.status import ApiError
from localcloud.healthcare.wildcards import parse_gcs_source

CHUNK = 128


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


@dataclass(frozen=True)
class _Candidate:
    source: str
    data: bytes
    sha256: str
    parsed: ParsedInstance | None
    rejection: InstanceRejected | None


def examine(source: str, data: bytes) -> _Candidate:
    """Hash and parse one file (runs in worker threads)."""
    sha = hashlib.sha256(data).hexdigest()
    try:
        return _Candidate(source, data, sha, parse_instance(data), None)
    except InstanceRejected as exc:
        return _Candidate(source, data, sha, None, exc)


class InstanceWriter:
    """Decides and stores files for every store; one writer at a time per store."""

    def __init__(self, repository: Repository) -> None:
        self._repository = repository
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _lock_for(self, store: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(store, threading.Lock())

    def store(self, store: str, candidates: Sequence[_Candidate]) -> list[FileOutcome]:
        """Store a chunk of examined files in order; one transaction for the new ones."""
        outcomes: list[FileOutcome] = []
        new_rows: list[tuple[ParsedInstance, str, int]] = []
        seen: dict[str, tuple[ParsedInstance, str]] = {}
        with self._lock_for(store):
            for item in candidates:
                if item.parsed is None:
                    rejection = item.rejection or InstanceRejected("not a DICOM file")
                    outcomes.append(
                        FileOutcome(
                            item.source, False, code=rejection.code, message=rejection.message
                        )
                    )
                    continue
                parsed = item.parsed
                existing: tuple[str, str, str] | None = None
                if parsed.sop_uid in seen:
                    earlier, earlier_sha = seen[parsed.sop_uid]
                    existing = (earlier.study_uid, earlier.series_uid, earlier_sha)
                else:
                    row = self._repository.find_instance(store, parsed.sop_uid)
                    if row is not None:
                        existing = (row.study, row.series, row.sha256)
                if existing is None:
                    self._repository.write_blob(item.sha256, item.data)
                    new_rows.append((parsed, item.sha256, len(item.data)))
                    seen[parsed.sop_uid] = (parsed, item.sha256)
                    outcomes.append(FileOutcome(item.source, True, parsed=parsed))
                elif existing == (parsed.study_uid, parsed.series_uid, item.sha256):
                    outcomes.append(FileOutcome(item.source, False, True, parsed=parsed))
                elif existing[:2] == (parsed.study_uid, parsed.series_uid):
                    outcomes.append(
                        FileOutcome(
                            item.source, False, parsed=parsed, code=6, message=CHECKSUM_MISMATCH
                        )
                    )
                else:
                    outcomes.append(
                        FileOutcome(
                            item.source,
                            False,
                            parsed=parsed,
                            code=6,
                            message="An instance with this SOPInstanceUID already exists "
                            "in this DICOM Store under a different study or series",
                        )
                    )
            if new_rows:
                self._repository.add_instances(store, new_rows)
        return outcomes


def run_import(
    operation: RunningOperation,
    store: str,
    source_uri: str,
    storage: StorageAccess,
    writer: InstanceWriter,
    checkpoint: Callable[[RunningOperation], None],
) -> dict[str, Any] | None:
    """The body of a dicomStores.import operation.

    Raises:
        ApiError: the bucket is missing or nothing matches the URI.
    """
    try:
        pattern = parse_gcs_source(source_uri)
    except ValueError as exc:
        raise ApiError("INVALID_ARGUMENT", str(exc)) from None
    names = sorted(
        n
        for n in storage.list_names(pattern.bucket, pattern.prefix)
        if not n.endswith("/") and pattern.matches(n)
    )
    if not names:
        raise ApiError("NOT_FOUND", f"no Cloud Storage objects match {source_uri}")
    operation.set_pending(len(names))
    checkpoint(operation)

    def fetch(name: str) -> _Candidate:
        source = f"gs://{pattern.bucket}/{name}"
        try:
            data = storage.download(pattern.bucket, name)
        except Exception as exc:
            # A vanished or unreadable object fails alone, like any other per-file error.
            return _Candidate(source, b"", "", None, InstanceRejected(f"cannot read: {exc}", 5))
        return examine(source, data)

    for start in range(0, len(names), CHUNK):
        if operation.cancelled.is_set():
            break
        candidates = list(storage.pool.map(fetch, names[start : start + CHUNK]))
        outcomes = writer.store(store, candidates)
        for outcome in outcomes:
            if not outcome.ok:
                operation.log_failure(outcome.source, outcome.code, outcome.message)
        ok = sum(1 for o in outcomes if o.ok)
        operation.count(success=ok, failure=len(outcomes) - ok)
        checkpoint(operation)
    return None
