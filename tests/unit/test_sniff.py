"""Which objects the sniff reads: only those no glob matches, when it is on."""

from __future__ import annotations

import pytest

from dicomflow.config import load_settings
from dicomflow.errors import ConfigError
from dicomflow.events import StorageObject
from dicomflow.sniff import needs_sniff

BASE = {
    "DICOMFLOW_DICOM_STORE": "projects/p/locations/l/datasets/d/dicomStores/s",
    "DICOMFLOW_LANDING_BUCKET": "land-bkt",
    "DICOMFLOW_STAGING_BUCKET": "stage-bkt",
    "DICOMFLOW_BACKUP_BUCKET": "backup-bkt",
    "DICOMFLOW_ALERTS_TOPIC": "projects/p/topics/alerts",
}


def obj(name: str, size: int = 1000, bucket: str = "land-bkt") -> StorageObject:
    return StorageObject(bucket=bucket, name=name, generation="1", size=size)


def test_sniff_is_on_by_default() -> None:
    assert load_settings(BASE).sniff is True


@pytest.mark.parametrize(
    ("raw", "value"),
    [("true", True), ("FALSE", False), ("1", True), ("0", False), ("on", True), ("no", False)],
)
def test_sniff_setting(raw: str, value: bool) -> None:
    assert load_settings({**BASE, "DICOMFLOW_SNIFF": raw}).sniff is value


def test_a_bad_sniff_setting_names_the_setting_and_the_fix() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({**BASE, "DICOMFLOW_SNIFF": "maybe"})
    assert "DICOMFLOW_SNIFF" in str(caught.value)
    assert "'maybe'" in str(caught.value)
    assert "DICOMFLOW_SNIFF=true" in str(caught.value)


@pytest.mark.parametrize(
    ("target", "sniffed"),
    [
        (obj("modality/IM000001"), True),
        (obj("notes/readme.txt"), True),
        (obj("scan.dcm"), False),  # a glob matches: ingested without a sniff
        (obj("SCAN.DCM"), False),
        (obj("modality/IM000001", size=131), False),  # too small to hold the magic
        (obj("modality/IM000001", size=132), True),
        (obj("modality/IM000001", size=0), False),
        (obj("folder/"), False),
        (obj("batches/w/k.dcm", bucket="stage-bkt"), False),  # the pipeline's own
        (obj("batches/w/k", bucket="stage-bkt"), False),
    ],
)
def test_which_objects_are_sniffed(target: StorageObject, sniffed: bool) -> None:
    assert needs_sniff(load_settings(BASE), target) is sniffed


def test_nothing_is_sniffed_when_off_or_outside_the_prefixes() -> None:
    off = load_settings({**BASE, "DICOMFLOW_SNIFF": "false"})
    assert not needs_sniff(off, obj("modality/IM000001"))
    scoped = load_settings({**BASE, "DICOMFLOW_INCLUDE_PREFIXES": "incoming/"})
    assert not needs_sniff(scoped, obj("other/IM000001"))
    assert needs_sniff(scoped, obj("incoming/IM000001"))
