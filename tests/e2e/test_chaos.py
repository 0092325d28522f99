"""The chaos scenario at a small size: faults, repeated and reordered events, killed functions.

The same run as ``bench/chaos.py`` (see ``localcloud.chaos``), with M = 160,
so that it fits the suite's time budget. It fails on any broken invariant:
a valid file not in the store exactly once, a broken file not quarantined
with its reason, an incomplete ledger, a dead-lettered event, a false alert.

Sized for a loaded 2-core machine (about 2 minutes at a load average of 25):
a kill every 10 s on average (each costs 2-3 s of downtime while the function
restarts), redelivery backoff capped at 5 s, and the crash-repair delay of an
import whose starter was killed scaled to 30 s (DICOMFLOW_IMPORT_RESTART_SECONDS).
With the real 300 s delay, one kill between the import intent and the operation
record left a whole batch ``staged`` past the old 150 s settle timeout.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomflow import log
from localcloud.chaos import chaos_corpus, check_invariants, run_chaos

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_chaos_run_keeps_every_invariant(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    with (tmp_path / "logs" / "test.log").open("a") as stream:
        log.configure(stream=stream)
        result = run_chaos(
            160,
            tmp_path / "home",
            seed=7,
            kill_interval=10.0,
            max_backoff=5.0,
            settle_timeout=120.0,
            wait_quarantine_alerts=False,
            log=lambda _message: None,
        )
    # "stuck": for entries not final, their batches and which markers exist.
    assert result.ok, (result.problems, result.stats.get("stuck"))
    assert sum(result.stats["kills"].values()) >= 2, result.stats
    assert result.stats["storageFaults"] > 0
    assert result.stats["eventsDuplicated"] > 0
    assert result.stats["storedInstances"] == result.uploads - result.broken


def test_the_checker_sees_a_lost_file_and_a_false_alert() -> None:
    uploads = chaos_corpus(40, seed=3)
    expected = {f"k{i}": u for i, u in enumerate(uploads)}
    problems = check_invariants(
        expected,
        entries={},
        stored={},
        quarantine_objects={},
        alerts=[{"kind": "import_failed", "subject": "batch/x/import_failed"}],
        dead_letters=[],
        require_quarantine_alerts=True,
    )
    text = "\n".join(problems)
    assert "40 uploads without a ledger entry" in text
    assert "valid files missing from the store" in text
    assert "1 false alerts" in text
    assert "quarantined alerts cover 0 of 2 broken files" in text


def test_the_corpus_has_about_five_percent_broken_files_of_each_kind() -> None:
    uploads = chaos_corpus(300, seed=1)
    broken = [u for u in uploads if u.broken]
    assert len(uploads) == 300
    assert len(broken) == 15
    assert {u.broken for u in broken} == {"not-dicom", "truncated", "missing-uid"}
    assert len({u.sop_uid for u in uploads if not u.broken}) == 285
