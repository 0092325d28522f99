"""``terraform init && terraform validate`` of infra/, offline, for both google provider majors
that infra/versions.tf allows (see tests/tfvalidate). Skipped only where terraform is absent."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.tfvalidate import run

INFRA = Path(__file__).resolve().parents[2] / "infra"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("terraform") is None,
        reason="terraform is not installed: terraform validate is skipped",
    ),
]


@pytest.mark.parametrize("major", run.MAJORS)
def test_infra_is_valid_against_the_provider_schema(major: str) -> None:
    result = run.validate(INFRA, major)
    assert result.ok, result.summary() + "\n" + result.output


def test_a_misspelled_attribute_fails(tmp_path: Path) -> None:
    """One misspelling at the top of a resource, one in a nested block, one in a reference."""
    copy = tmp_path / "infra"
    run.copy_config(INFRA, copy)
    for sibling in ("main.py", "requirements.txt", "dicomflow"):
        (tmp_path / sibling).symlink_to(INFRA.parent / sibling)
    storage = copy / "storage.tf"
    text = storage.read_text()
    assert "public_access_prevention    =" in text and "days_since_noncurrent_time" in text
    text = text.replace("public_access_prevention    =", "public_acess_prevention     =", 1)
    text = text.replace("days_since_noncurrent_time", "days_since_noncurent_time", 1)
    storage.write_text(text)
    outputs = copy / "outputs.tf"
    text = outputs.read_text()
    assert "value       = google_pubsub_topic.alerts.id\n" in text
    outputs.write_text(
        text.replace("google_pubsub_topic.alerts.id\n", "google_pubsub_topic.alerts.idd\n")
    )

    result = run.validate(copy, "6")

    assert not result.ok
    found = {(d["summary"], str(d.get("detail", ""))) for d in result.diagnostics}
    summaries = " | ".join(f"{s}: {d}" for s, d in found)
    assert "public_acess_prevention" in summaries, summaries
    assert "days_since_noncurent_time" in summaries, summaries
    assert any(s == "Unsupported attribute" and '"idd"' in d for s, d in found), summaries


@pytest.mark.parametrize("major", run.MAJORS)
def test_the_extracted_schema_holds_what_the_provider_documents(major: str) -> None:
    """Facts of the real google provider schema (its docs), read back from the extraction."""
    extracted = run.extracted(major)
    assert extracted["version"].startswith(f"{major}.")
    bucket = extracted["resource_schemas"]["google_storage_bucket"]["block"]
    assert bucket["attributes"]["name"] == {"type": "string", "required": True}
    assert bucket["attributes"]["location"] == {"type": "string", "required": True}
    assert bucket["attributes"]["labels"]["type"] == ["map", "string"]
    assert bucket["attributes"]["self_link"] == {"type": "string", "computed": True}
    rule = bucket["block_types"]["lifecycle_rule"]
    assert rule["nesting_mode"] == "list" and "max_items" not in rule
    action = rule["block"]["block_types"]["action"]
    assert (action["nesting_mode"], action["min_items"], action["max_items"]) == ("set", 1, 1)
    condition = rule["block"]["block_types"]["condition"]["block"]["attributes"]
    assert condition["matches_prefix"]["type"] == ["list", "string"]
    assert condition["age"]["type"] == "number"
    assert bucket["block_types"]["retention_policy"]["max_items"] == 1
    function = extracted["resource_schemas"]["google_cloudfunctions2_function"]["block"]
    service = function["block_types"]["service_config"]["block"]["attributes"]
    assert service["uri"] == {"type": "string", "computed": True}
    account = extracted["data_source_schemas"]["google_storage_project_service_account"]
    assert account["block"]["attributes"]["member"]["computed"] is True
    assert "alias" not in extracted["provider"]["block"]["attributes"]
    assert extracted["provider"]["block"]["attributes"]["project"]["optional"] is True
