"""The chaos scenario at its smallest size: faults, repeated and reordered events, killed
functions.

The same run as ``bench/chaos.py`` (see ``localcloud.chaos``), with M = 75: the
smallest M whose corpus has two conflicting pairs beside a broken file of each kind,
so that it fits the suite's time budget. Every kind of fault must happen at least once
(``stats["faultsFired"]``): Storage 429, 503 and lost answers, each faulted Healthcare
method (``every_fault``: a small run imports only a batch or two), kills of ingest and
of report, repeated and delayed events. It fails on any broken invariant: a valid file
not in the store exactly once, a conflicting pair without one imported file and one
alerted conflict, a broken file not quarantined with its reason, an upload without a
final outcome, a dead-lettered event, a false alert, a function revived after the kills.

Sized for a loaded 2-core machine: a kill every 10 s on average (each costs 2-3 s of
downtime while the function restarts), with a seed whose first two kills hit ingest
and report; redelivery backoff capped at 5 s, and the crash-repair delay of an import
whose starter was killed scaled to 30 s (DICOMFLOW_IMPORT_RESTART_SECONDS): with the
real 300 s, one kill between the import intent and the operation record leaves a whole
batch ``staged`` past the settle timeout.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from dicomflow import log
from dicomflow.ops.outcomes import Outcome
from dicomflow.staging import staged_name
from localcloud.chaos import (
    BROKEN_KINDS,
    HEALTHCARE_FAULTS,
    chaos_corpus,
    check_invariants,
    run_chaos,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

M = 75
SEED = 39


def test_chaos_run_keeps_every_invariant(tmp_path: Path) -> None:
    corpus = chaos_corpus(M, seed=SEED)
    assert {u.broken for u in corpus if u.broken} == set(BROKEN_KINDS)
    assert len({u.pair for u in corpus if u.pair is not None}) == 2
    (tmp_path / "logs").mkdir()
    with (tmp_path / "logs" / "test.log").open("a") as stream:
        log.configure(stream=stream)
        result = run_chaos(
            M,
            tmp_path / "home",
            seed=SEED,
            every_fault=True,
            kill_interval=10.0,
            max_backoff=5.0,
            settle_timeout=120.0,
            wait_quarantine_alerts=False,
            log=lambda _message: None,
        )
    # "stuck": for entries not final, their batches and which markers exist.
    assert result.ok, (result.problems, result.stats.get("stuck"))
    assert sum(result.stats["kills"].values()) >= 2, result.stats
    fired = result.stats["faultsFired"]
    assert len(fired) == 3 + len(HEALTHCARE_FAULTS) + 4
    assert [kind for kind, times in fired.items() if times == 0] == [], fired
    assert result.stats["storageFaults"] > 0
    assert result.stats["storageAfterFaults"] > 0
    assert result.stats["eventsDuplicated"] > 0
    assert result.stats["revived"] == []
    pairs = result.stats["conflictPairs"]
    assert pairs >= 2
    assert result.stats["conflictsDetected"] == pairs
    assert result.stats["storedInstances"] == result.uploads - result.broken - pairs
    # The leak scan (a hit is a problem above) read every function's log and the alerts.
    scan = result.stats["leakScan"]
    assert scan["found"] == 0 and scan["logLines"] > 100 and scan["alerts"] > 0
    assert scan["markers"]["SOPInstanceUID"] >= result.uploads - result.broken - pairs
    assert scan["markers"]["object name"] >= result.uploads


def test_the_checker_sees_a_lost_file_and_a_false_alert() -> None:
    uploads = chaos_corpus(40, seed=3)
    expected = {f"k{i}": u for i, u in enumerate(uploads)}
    problems = check_invariants(
        expected,
        found={},
        stored={},
        quarantine_objects={},
        alerts=[{"alertId": "a", "kind": "import_failed", "subject": "batch/x/import_failed"}],
        dead_letters=[],
        require_quarantine_alerts=True,
    )
    text = "\n".join(problems)
    assert "40 uploads without an outcome" in text
    assert "valid files missing from the store" in text
    assert "1 false alerts" in text
    assert "quarantined alerts cover 0 of 2 files" in text
    assert "conflicting pair without one imported and one conflict" in text


def test_the_checker_wants_one_imported_and_one_alerted_conflict_per_pair() -> None:
    uploads = [u for u in chaos_corpus(60, seed=2) if u.pair == 0]
    first, second = uploads
    keys = {"k1": first, "k2": second}
    found = {
        "k1": Outcome("k1", "imported", batch="b1", window="w1"),
        "k2": Outcome("k2", "conflict", batch="b2", window="w2"),
    }
    stored = {str(first.sop_uid): first.sha256}
    staged = {staged_name("w1", "k1"), staged_name("w2", "k2")}
    alert = {
        "alertId": "c",
        "kind": "conflict",
        "subject": "batch/b2/conflict",
        "details": {"batch": "b2", "files": 1, "sampleFiles": [{"key": "k2"}], "samples": ["L"]},
    }

    def check(**changes: Any) -> list[str]:
        args: dict[str, Any] = {
            "found": found,
            "stored": stored,
            "alerts": [alert],
            "staged_names": staged,
        }
        args.update(changes)
        return check_invariants(
            keys,
            args["found"],
            args["stored"],
            {},
            args["alerts"],
            [],
            True,
            staged_names=args["staged_names"],
            label=lambda _upload: "L",
        )

    assert check() == []
    assert "conflict alerts cover 0 of 1 files" in "\n".join(check(alerts=[]))
    assert "1 conflicts whose staging copy is gone" in "\n".join(
        check(staged_names={staged_name("w1", "k1")})
    )
    both = {**found, "k2": Outcome("k2", "imported", batch="b2", window="w2")}
    assert "without one imported and one conflict" in "\n".join(check(found=both))
    assert "bytes differ" in "\n".join(check(stored={str(first.sop_uid): second.sha256}))


def test_the_corpus_has_broken_files_of_each_kind_and_conflicting_pairs() -> None:
    uploads = chaos_corpus(300, seed=1)
    broken = [u for u in uploads if u.broken]
    pairs = Counter(u.pair for u in uploads if u.pair is not None)
    assert len(uploads) == 300
    assert len(broken) == 15
    assert {u.broken for u in broken} == {"not-dicom", "truncated", "missing-uid"}
    assert len(pairs) == 6 and set(pairs.values()) == {2}
    for pair in pairs:
        a, b = (u for u in uploads if u.pair == pair)
        assert a.sop_uid == b.sop_uid and a.sha256 != b.sha256
    assert len({u.sop_uid for u in uploads if not u.broken}) == 285 - 6
