"""The emulator's index checkpoints its WAL on a thread of its own, never inside a commit."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from localcloud.healthcare import repository
from localcloud.healthcare.instances import ParsedInstance
from localcloud.healthcare.repository import Repository

BLOB = repository.INLINE_BLOB_BYTES  # the largest blob kept in the index


def _rows(count: int) -> list[tuple[ParsedInstance, str, bytes]]:
    rows = []
    for index in range(count):
        data = bytes([index]) * BLOB
        parsed = ParsedInstance(
            "1.2", "1.2.3", f"1.2.3.{index}", "1.2.840", "1.2.840.10008.1.2.1", {}
        )
        rows.append((parsed, hashlib.sha256(data).hexdigest(), data))
    return rows


def test_a_commit_leaves_the_checkpoint_to_the_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(repository, "CHECKPOINT_INTERVAL_SECONDS", 60.0)
    store = Repository(tmp_path)
    store.add_instances("s", _rows(6))
    # 6 MiB committed: SQLite's own checkpoint (every 4 MB of WAL) would have copied it.
    assert (tmp_path / "index.sqlite3").stat().st_size < BLOB
    assert (tmp_path / "index.sqlite3-wal").stat().st_size > 6 * BLOB
    store.close()  # closing checkpoints the rest
    assert (tmp_path / "index.sqlite3").stat().st_size > 6 * BLOB
    reopened = Repository(tmp_path)
    assert len(reopened.query_instances("s")) == 6
    reopened.close()


def test_the_thread_checkpoints_a_grown_wal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(repository, "CHECKPOINT_INTERVAL_SECONDS", 0.05)
    store = Repository(tmp_path)
    try:
        store.add_instances("s", _rows(6))
        deadline = time.monotonic() + 30
        while (tmp_path / "index.sqlite3").stat().st_size < 6 * BLOB:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        store.close()
