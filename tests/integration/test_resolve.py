# The operator tests' fixtures are imported by name, and test functions take them as arguments.
# ruff: noqa: F811
"""``dicomflow resolve``: a conflict settled either way, through the real pipeline.

Two files are uploaded, imported and verified; then two files with the same UIDs and
other bytes come in and are verified as conflicts. One is settled with --keep-stored,
the other with --replace, whose re-import a later batch verifies.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydicom.uid import generate_uid

from dicomflow import objects, verify
from dicomflow.ops import cli, redrive, resolve
from tests.ingest_support import make_instance
from tests.integration.test_operator_commands import Pipeline, p  # noqa: F401


def run(p: Pipeline, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    code = cli.main(["resolve", *argv], make_ctx=lambda: p.ctx)
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip() else None, err


def test_resolve_keeps_the_stored_instance_or_replaces_it(
    p: Pipeline, capsys: pytest.CaptureFixture[str]
) -> None:
    uids = [(generate_uid(), generate_uid(), generate_uid()) for _ in range(2)]
    first = [make_instance(*u) for u in uids]
    second = [make_instance(*u, overrides={"Modality": "CT"}) for u in uids]
    for i, data in enumerate(first):
        p.ingest(p.upload(f"resolve/first-{i}.dcm", data))
    p.settle()
    later = [p.upload(f"resolve/second-{i}.dcm", data) for i, data in enumerate(second)]
    for obj in later:
        p.ingest(obj)
    p.settle()
    keep, replace = (p.key(o) for o in later)
    assert {p.outcome(k).status for k in (keep, replace)} == {verify.CONFLICT}
    before = p.status(capsys)["files"]["totals"]
    assert before["conflict"] == 2

    # --keep-stored: the store keeps the first bytes; the decision is on record.
    code, kept, _ = run(p, capsys, keep, "--keep-stored", "--json")
    assert code == 0 and kept["action"] == "keep-stored" and kept["result"] == "resolved"
    study, series, sop = uids[0]
    assert verify.retrieve_bytes(p.ctx, study, series, sop) == first[0]
    record = objects.read_json(p.bucket, resolve.record_name(kept["batch"], keep))
    assert record is not None and record["action"] == "keep-stored"
    assert (
        record["stored"]["checksum"] and record["stored"]["checksum"] != record["file"]["checksum"]
    )
    code, _, err = run(p, capsys, keep, "--replace")
    assert code == 1 and "settled with --keep-stored" in err

    # --replace: the stored instance goes, the file is imported again by a later batch.
    code, replaced, _ = run(p, capsys, replace, "--replace", "--json")
    assert code == 0 and replaced["record"]["deleted"] == "deleted"
    reimport = replaced["record"]["reimport"]
    assert reimport["result"] == redrive.RESTAGED and reimport["retryKey"]
    p.settle()
    assert p.outcome(reimport["retryKey"]).status == verify.IMPORTED
    study, series, sop = uids[1]
    assert verify.retrieve_bytes(p.ctx, study, series, sop) == second[1]
    record = objects.read_json(p.bucket, resolve.record_name(replaced["batch"], replace))
    assert record is not None and record["deleted"] == "deleted"
    assert record["reimport"]["retryKey"] == reimport["retryKey"]
    after = p.status(capsys)["files"]["totals"]
    assert after["conflict"] == 1 and after["imported"] == before["imported"] + 1
    assert resolve.resolved_counts(p.ctx) == {"keep-stored": 1, "replace": 1}

    # A repeat changes nothing (the new instance is not deleted); refusals are clear.
    code, again, _ = run(p, capsys, replace, "--replace", "--json")
    assert code == 0 and again["result"] == "already"
    assert verify.retrieve_bytes(p.ctx, study, series, sop) == second[1]
    code, _, err = run(p, capsys, reimport["retryKey"], "--keep-stored")
    assert code == 1 and "imported, not a conflict" in err
    code, _, err = run(p, capsys, "0" * 32, "--keep-stored")
    assert code == 1 and "no file with key" in err
