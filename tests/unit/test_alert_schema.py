"""The alert contract: the code's kinds, the JSON Schema and the runbook agree.

Every alert the rest of the suite builds or reads back is checked against the schema
by ``tests/alert_contract.py`` (installed by ``tests/conftest.py``); these tests check
the schema itself, its version, the three lists of kinds, the runbook's field tables
and its examples, and that the checker can fail.
"""

from __future__ import annotations

import copy
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from dicomflow import alerts
from tests import alert_contract


def test_schema_is_a_valid_2020_12_schema() -> None:
    schema = alert_contract.schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)
    Draft202012Validator.check_schema(alert_contract.strict_schema())


def test_schema_id_carries_the_current_schema_version() -> None:
    """A change that breaks consumers raises alerts.SCHEMA_VERSION, the $id and the consts."""
    schema = alert_contract.schema()
    version = alerts.SCHEMA_VERSION
    assert schema["$id"] == f"urn:dicomflow:alert:schemaVersion:{version}"
    assert schema["properties"]["schemaVersion"] == {
        "description": schema["properties"]["schemaVersion"]["description"],
        "const": version,
    }
    assert schema["$defs"]["attributes"]["properties"]["schemaVersion"] == {"const": str(version)}
    assert f"urn:dicomflow:alert:schemaVersion:{version}" in alert_contract.DOCS.read_text(
        encoding="utf-8"
    )


def test_code_schema_and_runbook_list_the_same_kinds() -> None:
    schema = alert_contract.schema()
    in_code = list(alerts.ALERT_KINDS)
    in_schema = schema["$defs"]["kind"]["enum"]
    with_rules = [rule["if"]["properties"]["kind"]["const"] for rule in schema["allOf"]]
    in_docs = list(alert_contract.runbook_sections())
    assert sorted(in_schema) == sorted(in_code), "schema $defs/kind/enum vs alerts.ALERT_KINDS"
    assert sorted(with_rules) == sorted(in_code), "schema allOf: one if/then rule per kind"
    assert sorted(in_docs) == sorted(in_code), "docs/alerts.md: one '## <kind>' section per kind"
    assert schema["$defs"]["severity"]["enum"] == list(alerts.SEVERITIES)


@pytest.mark.parametrize("kind", alerts.ALERT_KINDS)
def test_runbook_section_describes_the_schema_fields(kind: str) -> None:
    section = alert_contract.runbook_sections()[kind]
    assert alert_contract.table_fields(section) == alert_contract.detail_fields(kind)
    for part in ("**Severity**", "**Subject**", "**When it fires.**", "**What to do.**"):
        assert part in section, f"{kind}: no {part}"


@pytest.mark.parametrize("kind", alerts.ALERT_KINDS)
def test_runbook_example_is_what_build_alert_makes_and_passes_the_strict_schema(
    kind: str,
) -> None:
    """Every kind at least once, through the builder and the strict schema."""
    shown = alert_contract.runbook_example(kind)
    assert shown["kind"] == kind
    assert alert_contract.errors("strict", shown) == []
    built = alerts.build_alert(
        kind,
        shown["subject"],
        shown["severity"],
        shown["dicomStore"],
        shown["details"],
        datetime.fromisoformat(shown["time"].replace("Z", "+00:00")),
    )
    assert built.body() == shown
    assert alert_contract.message_errors(built.body(), built.attributes()) == []


def test_strict_schema_refuses_undescribed_or_missing_fields_the_published_one_allows() -> None:
    shown = alert_contract.runbook_example("export_failed")
    extra = copy.deepcopy(shown)
    extra["details"]["operatorNote"] = "x"
    extra["sentBy"] = "y"
    assert alert_contract.errors("published", extra) == []  # adding a field breaks no one
    strict = alert_contract.errors("strict", extra)
    assert any("operatorNote" in e for e in strict) and any("sentBy" in e for e in strict)

    nested = copy.deepcopy(alert_contract.runbook_example("import_failed"))
    nested["details"]["sampleFiles"][0]["patientHint"] = "x"
    assert any("patientHint" in e for e in alert_contract.errors("strict", nested))

    missing = copy.deepcopy(shown)
    del missing["details"]["problems"]
    assert any("'problems' is a required" in e for e in alert_contract.errors("published", missing))


def test_stalled_takes_either_shape_but_not_a_mix() -> None:
    operation = alert_contract.runbook_example("stalled")
    assert alert_contract.errors("strict", operation) == []
    store = operation["dicomStore"]
    starting = {
        **operation,
        "severity": "ERROR",
        "subject": f"{store}/exports/2026-11-25/attempt-1/starting",
        "details": {
            "date": "2026-11-25",
            "attempt": 1,
            "mode": "full",
            "mimeType": "application/dicom",
            "destination": "gs://backups/dicom/2026-11-25/",
            "state": "starting",
            "tickTime": "2026-11-25T02:00:00Z",
            "firstClaimedAt": "2026-11-25T02:00:01.512000Z",
            "takeovers": 2,
            "stuckSeconds": 1264,
            "thresholdSeconds": 1200,
            "marker": "gs://staging/state/exports/2026-11-25.json",
        },
    }
    assert alert_contract.errors("strict", starting) == []
    mixed = copy.deepcopy(starting)
    mixed["details"]["runningSeconds"] = 5
    assert alert_contract.errors("strict", mixed) != []


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda b: b.update(kind="made_up"), "$.kind"),
        (lambda b: b.update(severity="ERROR"), "$.severity"),  # backlog is a WARNING
        (lambda b: b.update(subject="backlog"), "$.subject"),
        (lambda b: b.update(alertId="ABC"), "$.alertId"),
        (lambda b: b.update(time="2026-11-25 13:02"), "$.time"),
        (lambda b: b.update(schemaVersion=b["schemaVersion"] + 1), "$.schemaVersion"),
        (lambda b: b["details"].update(batches="7"), "$.details.batches"),
        (lambda b: b.pop("dicomStore"), "'dicomStore' is a required property"),
    ],
)
def test_published_schema_refuses_a_broken_message(change: Any, fragment: str) -> None:
    body = copy.deepcopy(alert_contract.runbook_example("backlog"))
    change(body)
    assert any(fragment in e for e in alert_contract.errors("published", body))


def test_attributes_must_match_the_body() -> None:
    alert = alerts.build_alert(**alert_contract.build_args("quarantined"))
    attributes = alert.attributes()
    assert alert_contract.message_errors(alert.body(), attributes) == []
    assert alert_contract.message_errors(alert.body(), {**attributes, "kind": "dropped"}) != []
    assert alert_contract.errors("attributes", {**attributes, "schemaVersion": 1}) != []


def test_checker_catches_an_invalid_alert_built_by_the_pipeline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The conftest hook fails a test when the pipeline builds an alert the schema refuses."""
    good = alert_contract.build_args("quarantined")
    bad = {**good, "details": {**good["details"], "undocumented": 1}}
    checker = alert_contract.Checker()
    monkeypatch.setattr(alert_contract, "CHECKER", checker)
    # A caller in a module of the pipeline, as in dicomflow.feeds.
    module: dict[str, Any] = {"__name__": "dicomflow.feeds", "alerts": alerts}
    source = "def build(args):\n    return alerts.build_alert(**args)\n"
    exec(compile(source, "feeds", "exec"), module)
    build = module["build"]
    build(good)
    assert checker.problems == [] and checker.kinds == {"quarantined": 1}
    build(bad)
    (problem,) = checker.take()
    assert "dicomflow.feeds built an invalid 'quarantined' alert" in problem
    assert "undocumented" in problem
    alerts.build_alert(**bad)  # built by a test by hand: the envelope is what counts
    assert checker.take() == []


def test_the_demo_says_where_the_runbook_is(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from localcloud import demo

    monkeypatch.chdir(alert_contract.DOCS.parents[1])
    assert demo.runbook_line() == "alerts: what each kind means and what to do is in docs/alerts.md"
    assert demo.RUNBOOK == alert_contract.DOCS and demo.RUNBOOK.is_file()
    monkeypatch.chdir(tmp_path)
    assert str(demo.RUNBOOK) in demo.runbook_line()
