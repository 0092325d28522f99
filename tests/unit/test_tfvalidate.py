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
    copy.mkdir()
    for tf in INFRA.glob("*.tf"):
        shutil.copy(tf, copy / tf.name)
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
