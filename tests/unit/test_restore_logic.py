"""Pure parts of restores, drills and erasures: sampling, series counts, tombstone names."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from dicomflow import backup, keys, restore, tombstones
from dicomflow.config import load_settings
from dicomflow.errors import ConfigError
from dicomflow.names import DicomStoreName
from dicomflow.ops.cli_restore import target_store

STORE = "projects/p/locations/l/datasets/d/dicomStores/s"


def test_sample_studies_is_all_or_a_seeded_sample() -> None:
    studies = [f"1.{i}" for i in range(10)]
    assert restore.sample_studies(studies, 0, random.Random(1)) == sorted(studies)
    assert restore.sample_studies(studies, 50, random.Random(1)) == sorted(studies)
    picked = restore.sample_studies(studies, 3, random.Random("2026-11-25"))
    assert len(picked) == 3 and set(picked) <= set(studies)
    assert picked == restore.sample_studies(studies[::-1], 3, random.Random("2026-11-25"))


def test_a_rerun_has_its_own_folder_and_is_never_counted_into_the_first() -> None:
    settings = load_settings(
        {
            "DICOMFLOW_DICOM_STORE": STORE,
            "DICOMFLOW_LANDING_BUCKET": "land",
            "DICOMFLOW_STAGING_BUCKET": "stage",
            "DICOMFLOW_BACKUP_BUCKET": "back",
            "DICOMFLOW_ALERTS_TOPIC": "projects/p/topics/t",
        }
    )
    day = datetime(2026, 11, 25, tzinfo=UTC).date()
    first = backup.attempt_folder(settings, day)
    assert first == backup.dated_folder(settings, day) == "backups/2026-11-25/"
    assert backup.attempt_folder(settings, day, 3) == "backups/2026-11-25/rerun-3/"
    assert backup.destination_uri(settings, day, 2) == "gs://back/backups/2026-11-25/rerun-2/"
    names = [
        f"{first}1.2/1.3/1.4.dcm",
        f"{first}_MANIFEST.json",
        f"{first}rerun-2/1.2/1.3/1.4.dcm",
        f"{first}rerun-2/1.2/1.3/1.5.dcm",
        f"{first}rerun-2/_MANIFEST.json",
    ]
    assert backup.found_counts(names, first) == backup.Counts(1, 1)
    assert backup.series_counts(names, first) == {"1.2/1.3": 1}
    assert backup.found_counts(names, f"{first}rerun-2/") == backup.Counts(2, 2)
    attempts = [backup.attempt_of(n.removeprefix(first)) for n in names]
    assert attempts == [None, 1, None, None, 2]
    assert backup.attempt_of("rerun-1/_MANIFEST.json") is None
    assert backup.attempt_of("rerun-x/_MANIFEST.json") is None


@pytest.mark.parametrize(
    ("manifests", "picked"),
    [
        ({}, None),
        ({1: {"state": "finished", "complete": True}}, 1),
        # The rerun failed: the first run's complete backup is the one to restore.
        ({1: {"state": "finished", "complete": True}, 2: {"state": "finished"}}, 1),
        (
            {
                1: {"state": "finished", "complete": True},
                3: {"state": "finished", "complete": True},
            },
            3,
        ),
        # None complete: the latest, whose state tells the reader why it cannot be used.
        ({1: {"state": "finished"}, 2: {"state": "finished", "complete": False}}, 2),
    ],
)
def test_a_reader_takes_the_latest_complete_attempt(
    manifests: dict[int, dict[str, object]], picked: int | None
) -> None:
    assert backup.pick_attempt(manifests) == picked


def test_series_counts_and_the_manifest_keep_them() -> None:
    folder = "backups/2026-11-25/"
    names = [
        f"{folder}1.1/2.1/3.1.dcm",
        f"{folder}1.1/2.1/3.2.dcm",
        f"{folder}1.1/2.2/3.3.dcm",
        f"{folder}{backup.MANIFEST_NAME}",
        "backups/2026-11-24/1.9/2.9/3.9.dcm",
    ]
    series = backup.series_counts(names, folder)
    assert series == {"1.1/2.1": 2, "1.1/2.2": 1}
    marker = {"expected": {"instances": 3, "objects": 3}, "mode": "full"}
    operation = {"done": True, "name": "op"}
    manifest = backup.build_manifest(
        marker, operation, backup.Counts(3, 3), datetime(2026, 11, 25, tzinfo=UTC), series
    )
    assert manifest["series"] == series and manifest["complete"] is True


def test_tombstone_names_round_trip_and_hide_the_uid() -> None:
    key = keys.DeploymentKey(b"s" * 32)
    label = tombstones.label_of(key, "1.2.840.99")
    name = tombstones.name_of(label)
    assert name.startswith(f"tombstones/{key.key_id}-") and "1.2.840.99" not in name
    assert tombstones.label_from_name(name) == label
    assert tombstones.label_from_name("tombstones/readme.txt") is None
    other = keys.DeploymentKey(b"t" * 32)
    assert tombstones.label_of(other, "1.2.840.99") != label
    assert key.hash(keys.UID, "1.2.840.99") != label  # its own purpose
    with pytest.raises(ValueError, match="not a label"):
        tombstones.name_of("1.2.840.99")


def test_into_takes_a_store_id_or_a_full_name() -> None:
    live = DicomStoreName.from_string(STORE)
    assert str(target_store("restored", live)) == STORE.replace("/s", "/restored")
    other = "projects/p/locations/l/datasets/e/dicomStores/x"
    assert str(target_store(other, live)) == other
    with pytest.raises(ValueError):
        target_store("projects/p/bad", live)


def _env(**extra: str) -> dict[str, str]:
    return {
        "DICOMFLOW_DICOM_STORE": STORE,
        "DICOMFLOW_LANDING_BUCKET": "landing",
        "DICOMFLOW_STAGING_BUCKET": "staging",
        "DICOMFLOW_BACKUP_BUCKET": "backups",
        "DICOMFLOW_ALERTS_TOPIC": "projects/p/topics/t",
        **extra,
    }


def test_drill_settings_default_and_refuse_the_live_store() -> None:
    settings = load_settings(_env())
    assert settings.restore_drill_days == 7 and settings.restore_drill_studies == 50
    assert str(settings.drill_store) == STORE + "-drill"
    assert load_settings(_env(DICOMFLOW_RESTORE_DRILL_DAYS="0")).restore_drill_days == 0
    with pytest.raises(ConfigError, match="DICOMFLOW_DRILL_STORE: names the live store"):
        load_settings(_env(DICOMFLOW_DRILL_STORE=STORE))
    with pytest.raises(ConfigError, match="DICOMFLOW_RESTORE_DRILL_STUDIES"):
        load_settings(_env(DICOMFLOW_RESTORE_DRILL_STUDIES="-1"))
    for name in ("restores/x/1.dcm", "drills/2026-11-25.json", "tombstones/a-b.json"):
        assert settings.is_pipeline_object("staging", name)
