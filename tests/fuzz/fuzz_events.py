"""Coverage-guided fuzzing of the event decoder and the two wildcard matchers with atheris.

Run from the repository root, with any libFuzzer flags::

    .venv/bin/python tests/fuzz/fuzz_events.py -runs=100000

The input is read as a finalize event's payload (``StorageObject.from_data``,
``parse_time`` and the ingest filter must classify it) and as an import URI plus
an object name (``parse_gcs_source``: ``ValueError`` or a pattern that answers
with a bool; ``matches_globs``: a bool). Anything else is a crash.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports(
    include=["dicomflow.events", "dicomflow.clock", "localcloud.healthcare.wildcards"]
):
    from dicomflow import alerts, clock, events, staging
    from dicomflow.config import load_settings
    from dicomflow.errors import PermanentError
    from localcloud.healthcare.wildcards import parse_gcs_source
    from tests.deployment_key import KEY_FILE

SETTINGS = load_settings(
    {
        "DICOMFLOW_DICOM_STORE": "projects/p/locations/l/datasets/d/dicomStores/s",
        "DICOMFLOW_LANDING_BUCKET": "landing",
        "DICOMFLOW_STAGING_BUCKET": "staging",
        "DICOMFLOW_BACKUP_BUCKET": "backups",
        "DICOMFLOW_ALERTS_TOPIC": "projects/p/topics/alerts",
        "DICOMFLOW_KEY_FILE": KEY_FILE,
    }
)
NOW = datetime(2026, 11, 25, 12, 53, tzinfo=UTC)
SKIP_REASONS = {None, "pipeline-object", "folder", "prefix", "pattern", "empty"}


FIELDS = ("bucket", "name", "generation", "size", "md5Hash", "crc32c", "contentType", "time")


def value(fdp: atheris.FuzzedDataProvider) -> Any:
    """A JSON value of any type, as a field of a payload might (wrongly) hold."""
    kind = fdp.ConsumeIntInRange(0, 6)
    if kind == 0:
        return fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 32))
    if kind == 1:
        return str(fdp.ConsumeInt(fdp.ConsumeIntInRange(1, 12)))
    if kind == 2:
        return fdp.ConsumeInt(fdp.ConsumeIntInRange(1, 12))
    if kind == 3:
        return fdp.ConsumeRegularFloat() if fdp.ConsumeBool() else fdp.ConsumeFloat()
    if kind == 4:
        return None
    if kind == 5:
        return fdp.ConsumeBool()
    return [fdp.ConsumeUnicode(4)]


def payload(fdp: atheris.FuzzedDataProvider) -> Any:
    """A finalize payload: each field present or not, with a value of any type."""
    if fdp.ConsumeBool():  # JSON text as it arrives
        try:
            return json.loads(fdp.ConsumeUnicode(fdp.remaining_bytes()))
        except (ValueError, RecursionError):
            return None
    return {key: value(fdp) for key in FIELDS if fdp.ConsumeBool()}


def decode(data: Any) -> None:
    try:
        obj = events.StorageObject.from_data(data)
    except PermanentError:
        return
    if events.skip_reason(SETTINGS, obj) not in SKIP_REASONS:
        raise AssertionError("an unknown skip reason")
    alerts.object_label(SETTINGS, obj.bucket, obj.name)
    staging.file_key(obj.bucket, obj.name, obj.generation)
    when = clock.parse_time(data.get("time"))
    events.is_too_old(when, NOW, 3600)


def match(uri: str, name: str) -> None:
    if not isinstance(events.matches_globs(name, (uri, "*.dcm")), bool):
        raise AssertionError("matches_globs answered with something else than a bool")
    try:
        pattern = parse_gcs_source(uri)
    except ValueError:
        return
    selected = pattern.matches(name)
    if selected and not name.startswith(pattern.prefix):
        raise AssertionError("a selected name outside the listing prefix")


def test_one_input(raw: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(raw)
    if fdp.ConsumeBool():
        decode(payload(fdp))
    else:
        uri = "gs://b/" + fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 64))
        match(uri, fdp.ConsumeUnicode(fdp.remaining_bytes()))


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
