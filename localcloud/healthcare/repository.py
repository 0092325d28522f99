"""Persistence: a SQLite index plus content-addressed blobs under the data directory.

Layout: ``DATA_DIR/index.sqlite3``; instance bytes up to ``INLINE_BLOB_BYTES``
live in its ``blobs`` table, larger ones in ``DATA_DIR/blobs/ab/<sha256>``.
Creating one file per instance costs more than parsing it, and SQLite stores
small blobs faster than a file system does, in the same transaction as their
index rows (WAL, synchronous=NORMAL: no fsync per transaction). Resource bodies
are kept as JSON. One connection is shared under a lock; the emulator's write
load is batch inserts, which a single writer handles best.

Checkpoints (copying the WAL into the database file, with an fsync of each)
run on a thread of their own with its own connection, once the WAL holds
``CHECKPOINT_BYTES``: SQLite's automatic checkpoint would run inside the commit
that crosses its threshold, and an import would wait for those fsyncs.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localcloud.healthcare.instances import ParsedInstance
from localcloud.healthcare.status import ApiError, not_found

_SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets (name TEXT PRIMARY KEY, seq INTEGER, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS dicom_stores (
    name TEXT PRIMARY KEY, dataset TEXT NOT NULL, seq INTEGER, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS operations (
    name TEXT PRIMARY KEY, dataset TEXT NOT NULL, seq INTEGER, done INTEGER, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS operation_logs (operation TEXT NOT NULL, entry TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS operation_logs_by_op ON operation_logs (operation);
CREATE TABLE IF NOT EXISTS instances (
    store TEXT NOT NULL, sop TEXT NOT NULL, study TEXT NOT NULL, series TEXT NOT NULL,
    sha256 TEXT NOT NULL, size INTEGER NOT NULL, syntax TEXT NOT NULL, seq INTEGER,
    attributes TEXT NOT NULL, PRIMARY KEY (store, sop));
CREATE INDEX IF NOT EXISTS instances_by_series ON instances (store, study, series);
CREATE TABLE IF NOT EXISTS blobs (sha256 TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS iam_policies (resource TEXT PRIMARY KEY, body TEXT NOT NULL);
"""


INLINE_BLOB_BYTES = 1 << 20
CHECKPOINT_BYTES = 4 << 20
CHECKPOINT_INTERVAL_SECONDS = 0.5
# The etag Google gives a resource on which no policy was ever set.
EMPTY_POLICY_ETAG = "ACAB"


@dataclass(frozen=True)
class StoredInstance:
    """One row of the instance index; its attributes are decoded when first asked for.

    An export reads every row of a store and needs none of them.
    """

    store: str
    sop: str
    study: str
    series: str
    sha256: str
    size: int
    syntax: str
    attributes_json: str

    @functools.cached_property
    def attributes(self) -> dict[str, Any]:
        """DICOM JSON of the indexed attributes, by 8-hex-digit tag."""
        decoded: dict[str, Any] = json.loads(self.attributes_json)
        return decoded


class Repository:
    """All persistent state of the emulator."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.blob_dir = data_dir / "blobs"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            data_dir / "index.sqlite3", check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._db.executescript(_SCHEMA)
        self._seq = self._max_seq()
        self._closing = threading.Event()
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="sqlite-checkpoint", daemon=True
        )
        self._checkpointer.start()

    def close(self) -> None:
        self._closing.set()
        self._checkpointer.join()
        with self._lock:
            self._db.close()  # the last connection to close checkpoints what is left

    def _checkpoint_loop(self) -> None:
        """Checkpoint the WAL whenever it has grown past ``CHECKPOINT_BYTES`` and changed."""
        wal = self.data_dir / "index.sqlite3-wal"
        connection = sqlite3.connect(self.data_dir / "index.sqlite3", isolation_level=None)
        checkpointed = 0
        try:
            connection.execute("PRAGMA synchronous=NORMAL")
            while not self._closing.wait(CHECKPOINT_INTERVAL_SECONDS):
                try:
                    state = wal.stat()
                    if state.st_size < CHECKPOINT_BYTES or state.st_mtime_ns == checkpointed:
                        continue
                    # PASSIVE: copies what it can without waiting for, or blocking, writers.
                    connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    checkpointed = state.st_mtime_ns
                except (OSError, sqlite3.Error):
                    continue  # no WAL yet, or busy: the next round tries again
        finally:
            connection.close()

    def _max_seq(self) -> int:
        highest = 0
        for table in ("datasets", "dicom_stores", "operations", "instances"):
            row = self._db.execute(f"SELECT COALESCE(MAX(seq), 0) FROM {table}").fetchone()
            highest = max(highest, int(row[0]))
        return highest

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # Datasets and DICOM stores share one shape: a name, a parent and a JSON body.

    def create_dataset(self, name: str, body: dict[str, Any]) -> None:
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO datasets VALUES (?, ?, ?)",
                    (name, self._next_seq(), json.dumps(body)),
                )
            except sqlite3.IntegrityError:
                raise ApiError("ALREADY_EXISTS", f"dataset {name} already exists") from None

    def get_dataset(self, name: str) -> dict[str, Any]:
        with self._lock:
            row = self._db.execute("SELECT body FROM datasets WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise not_found(f"dataset {name}")
        body: dict[str, Any] = json.loads(row[0])
        return body

    def list_datasets(self, parent: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT body FROM datasets WHERE name LIKE ? ESCAPE '\\' ORDER BY seq",
                (_like_prefix(parent + "/datasets/"),),
            ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def update_dataset(self, name: str, body: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE datasets SET body = ? WHERE name = ?", (json.dumps(body), name)
            )

    def delete_dataset(self, name: str) -> None:
        self.get_dataset(name)
        stores = [s["name"] for s in self.list_stores(name)]
        for store in stores:
            self.delete_store(store)
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM datasets WHERE name = ?", (name,))
            ops = [
                r[0]
                for r in self._db.execute("SELECT name FROM operations WHERE dataset = ?", (name,))
            ]
            self._db.executemany(
                "DELETE FROM operation_logs WHERE operation = ?", [(o,) for o in ops]
            )
            self._db.execute("DELETE FROM operations WHERE dataset = ?", (name,))
            self._db.execute("DELETE FROM iam_policies WHERE resource = ?", (name,))

    def create_store(self, name: str, dataset: str, body: dict[str, Any]) -> None:
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO dicom_stores VALUES (?, ?, ?, ?)",
                    (name, dataset, self._next_seq(), json.dumps(body)),
                )
            except sqlite3.IntegrityError:
                raise ApiError("ALREADY_EXISTS", f"DICOM store {name} already exists") from None

    def get_store(self, name: str) -> dict[str, Any]:
        with self._lock:
            row = self._db.execute(
                "SELECT body FROM dicom_stores WHERE name = ?", (name,)
            ).fetchone()
        if row is None:
            raise not_found(f"DICOM store {name}")
        body: dict[str, Any] = json.loads(row[0])
        return body

    def update_store(self, name: str, body: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE dicom_stores SET body = ? WHERE name = ?", (json.dumps(body), name)
            )

    def list_stores(self, dataset: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT body FROM dicom_stores WHERE dataset = ? ORDER BY seq", (dataset,)
            ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def delete_store(self, name: str) -> None:
        self.get_store(name)
        with self._lock:
            hashes = self._delete_instances("store = ?", (name,))
            self._db.execute("DELETE FROM dicom_stores WHERE name = ?", (name,))
            self._db.execute("DELETE FROM iam_policies WHERE resource = ?", (name,))
        self._drop_unreferenced(hashes)

    # IAM policies of datasets and DICOM stores; a resource without a row has none set.

    def get_policy(self, resource: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT body FROM iam_policies WHERE resource = ?", (resource,)
            ).fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def set_policy(
        self, resource: str, policy: dict[str, Any], expected_etag: str | None
    ) -> dict[str, Any]:
        """Store ``policy`` unless ``expected_etag`` is given and is not the current etag.

        Raises:
            ApiError: ABORTED when the policy changed since ``expected_etag`` was read.
        """
        with self._lock:
            current = self.get_policy(resource)
            current_etag = (current or {}).get("etag", EMPTY_POLICY_ETAG)
            if expected_etag is not None and expected_etag != current_etag:
                # The text IAM answers for a stale read-modify-write.
                raise ApiError(
                    "ABORTED",
                    "There were concurrent policy changes. Please retry the whole "
                    "read-modify-write with exponential backoff.",
                )
            self._db.execute(
                "INSERT OR REPLACE INTO iam_policies VALUES (?, ?)", (resource, json.dumps(policy))
            )
        return policy

    # Operations: the body is the Operation JSON; running ones are also held in memory.

    def save_operation(self, name: str, dataset: str, body: dict[str, Any], done: bool) -> None:
        with self._lock:
            row = self._db.execute("SELECT seq FROM operations WHERE name = ?", (name,)).fetchone()
            seq = int(row[0]) if row else self._next_seq()
            self._db.execute(
                "INSERT OR REPLACE INTO operations VALUES (?, ?, ?, ?, ?)",
                (name, dataset, seq, int(done), json.dumps(body)),
            )

    def get_operation(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT body FROM operations WHERE name = ?", (name,)).fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def list_operations(self, dataset: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT body FROM operations WHERE dataset = ? ORDER BY seq", (dataset,)
            ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def unfinished_operations(self) -> list[tuple[str, str, dict[str, Any]]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT name, dataset, body FROM operations WHERE done = 0"
            ).fetchall()
        return [(r[0], r[1], json.loads(r[2])) for r in rows]

    def add_logs(self, operation: str, entries: Sequence[dict[str, Any]]) -> None:
        if not entries:
            return
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO operation_logs VALUES (?, ?)",
                [(operation, json.dumps(e)) for e in entries],
            )

    def get_logs(self, operation: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT entry FROM operation_logs WHERE operation = ? ORDER BY rowid", (operation,)
            ).fetchall()
        return [json.loads(r[0]) for r in rows]

    # Instances and their blobs.

    def blob_path(self, sha256: str) -> Path:
        return self.blob_dir / sha256[:2] / sha256

    def _write_blob_file(self, sha256: str, data: bytes) -> None:
        """Write the bytes once; a blob with this hash already holds the same bytes."""
        path = self.blob_path(sha256)
        if path.exists():
            return
        path.parent.mkdir(exist_ok=True)
        partial = path.with_suffix(f".{threading.get_ident()}.part")
        partial.write_bytes(data)
        os.replace(partial, path)

    def read_blob(self, sha256: str) -> bytes:
        with self._lock:
            row = self._db.execute("SELECT data FROM blobs WHERE sha256 = ?", (sha256,)).fetchone()
        if row is not None:
            return bytes(row[0])
        return self.blob_path(sha256).read_bytes()

    def find_instance(self, store: str, sop: str) -> StoredInstance | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM instances WHERE store = ? AND sop = ?", (store, sop)
            ).fetchone()
        return None if row is None else _instance(row)

    def find_instances(self, store: str, sops: Sequence[str]) -> dict[str, tuple[str, str, str]]:
        """SOP UID -> (study, series, sha256) of those of ``sops`` the store holds."""
        found: dict[str, tuple[str, str, str]] = {}
        # SQLite allows 32,766 bound parameters; stay well below.
        for start in range(0, len(sops), 900):
            part = list(sops[start : start + 900])
            marks = ",".join("?" * len(part))
            with self._lock:
                rows = self._db.execute(
                    f"SELECT sop, study, series, sha256 FROM instances "
                    f"WHERE store = ? AND sop IN ({marks})",
                    [store, *part],
                ).fetchall()
            found.update({r[0]: (r[1], r[2], r[3]) for r in rows})
        return found

    def add_instances(self, store: str, rows: Iterable[tuple[ParsedInstance, str, bytes]]) -> None:
        """Store new instances and their bytes in one transaction: (parsed, sha256, data) each.

        Large blobs go to files first, so a row never points at missing bytes.
        """
        rows = list(rows)
        for _parsed, sha, data in rows:
            if len(data) > INLINE_BLOB_BYTES:
                self._write_blob_file(sha, data)
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR IGNORE INTO blobs VALUES (?, ?)",
                [(sha, data) for _p, sha, data in rows if len(data) <= INLINE_BLOB_BYTES],
            )
            self._db.executemany(
                "INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        store,
                        p.sop_uid,
                        p.study_uid,
                        p.series_uid,
                        sha,
                        len(data),
                        p.transfer_syntax,
                        self._next_seq(),
                        p.attributes_json,
                    )
                    for p, sha, data in rows
                ],
            )

    def query_instances(
        self,
        store: str,
        study: str | None = None,
        series: str | None = None,
        sop: str | None = None,
    ) -> list[StoredInstance]:
        clauses, args = ["store = ?"], [store]
        for column, value in (("study", study), ("series", series), ("sop", sop)):
            if value is not None:
                clauses.append(f"{column} = ?")
                args.append(value)
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM instances WHERE {' AND '.join(clauses)} ORDER BY seq", args
            ).fetchall()
        return [_instance(r) for r in rows]

    def delete_instances(
        self, store: str, study: str, series: str | None = None, sop: str | None = None
    ) -> int:
        """Delete matching instances; returns how many went."""
        clauses, args = ["store = ?", "study = ?"], [store, study]
        for column, value in (("series", series), ("sop", sop)):
            if value is not None:
                clauses.append(f"{column} = ?")
                args.append(value)
        with self._lock:
            hashes = self._delete_instances(" AND ".join(clauses), tuple(args))
        self._drop_unreferenced(hashes)
        return len(hashes)

    def _delete_instances(self, where: str, args: tuple[str, ...]) -> list[str]:
        hashes = [
            r[0] for r in self._db.execute(f"SELECT sha256 FROM instances WHERE {where}", args)
        ]
        self._db.execute(f"DELETE FROM instances WHERE {where}", args)
        return hashes

    def _drop_unreferenced(self, hashes: Iterable[str]) -> None:
        for sha in set(hashes):
            with self._lock:
                used = self._db.execute(
                    "SELECT 1 FROM instances WHERE sha256 = ? LIMIT 1", (sha,)
                ).fetchone()
                if used is None:
                    self._db.execute("DELETE FROM blobs WHERE sha256 = ?", (sha,))
            if used is None:
                self.blob_path(sha).unlink(missing_ok=True)


def _like_prefix(prefix: str) -> str:
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


def _instance(row: Sequence[Any]) -> StoredInstance:
    store, sop, study, series, sha, size, syntax, _seq, attributes = row
    return StoredInstance(store, sop, study, series, sha, int(size), syntax, attributes)
