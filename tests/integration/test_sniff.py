"""The sniff against fake-gcs-server, with its Storage calls counted by a proxy in front."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from google.cloud import storage

from dicomflow.config import Settings
from dicomflow.events import StorageObject
from dicomflow.sniff import sniffed_skip_reason
from localcloud.faultproxy import FaultProxy
from localcloud.storage import StorageServer, client
from tests.ingest_support import make_instance, make_settings, unique


@dataclass
class Landing:
    direct: storage.Client  # uploads, not counted
    counted: storage.Client  # the sniff's client, through the proxy
    proxy: FaultProxy
    settings: Settings

    def put(self, name: str, data: bytes) -> StorageObject:
        blob = self.direct.bucket(self.settings.landing_bucket).blob(name)
        blob.upload_from_string(data)
        return StorageObject(
            bucket=self.settings.landing_bucket,
            name=name,
            generation=str(blob.generation),
            size=len(data),
        )

    def calls(self) -> dict[str, int]:
        """Storage calls per operation, less the client's one background bucket lookup.

        google-cloud-storage fetches a bucket's metadata once per client and bucket, in
        the background, on its first download from it: a cost per process, not per object,
        and the ingest path pays it for its own reads anyway.
        """
        counts = dict(self.proxy.snapshot()["counts"])
        assert counts.pop("buckets.get", 0) <= 1
        return counts


@pytest.fixture
def landing(gcs_server: StorageServer) -> Iterator[Landing]:
    direct = gcs_server.client()
    bucket = direct.create_bucket(unique("sniff-land"))
    staging = direct.create_bucket(unique("sniff-stage"))
    proxy = FaultProxy(gcs_server.url).start()
    counted = client(proxy.url)
    try:
        yield Landing(direct, counted, proxy, make_settings(bucket.name, staging.name))
    finally:
        counted.close()
        proxy.stop()


def not_dicom(size: int) -> bytes:
    return (b"plain text, no preamble. " * (size // 25 + 1))[:size]


def test_extensionless_dicom_is_ingested_for_one_ranged_read(landing: Landing) -> None:
    dicom = landing.put("modality/IM000001", make_instance())
    assert sniffed_skip_reason(landing.settings, landing.counted, dicom) is None
    assert landing.calls() == {"objects.download": 1}


def test_extensionless_non_dicom_is_ignored_for_one_ranged_read(landing: Landing) -> None:
    text = landing.put("modality/README", not_dicom(4096))
    assert sniffed_skip_reason(landing.settings, landing.counted, text) == "pattern"
    assert landing.calls() == {"objects.download": 1}


def test_the_magic_must_sit_at_byte_128(landing: Landing) -> None:
    early = landing.put("x/early", b"DICM" + not_dicom(300))
    exact = landing.put("x/exact", b"\0" * 128 + b"DICM")  # 132 bytes, the smallest
    assert sniffed_skip_reason(landing.settings, landing.counted, early) == "pattern"
    assert sniffed_skip_reason(landing.settings, landing.counted, exact) is None
    assert landing.calls() == {"objects.download": 2}


def test_no_read_for_matching_small_or_unsniffed_objects(landing: Landing) -> None:
    settings = landing.settings
    matching = landing.put("study/a.dcm", make_instance())
    small = landing.put("study/tiny", b"\0" * 131)
    empty = landing.put("study/empty", b"")
    assert sniffed_skip_reason(settings, landing.counted, matching) is None
    assert sniffed_skip_reason(settings, landing.counted, small) == "pattern"
    assert sniffed_skip_reason(settings, landing.counted, empty) == "pattern"
    off = make_settings(settings.landing_bucket, settings.staging_bucket, DICOMFLOW_SNIFF="false")
    dicom = landing.put("modality/IM000002", make_instance())
    assert sniffed_skip_reason(off, landing.counted, dicom) == "pattern"
    assert landing.calls() == {}


def test_an_object_gone_since_its_event_reads_as_not_dicom(landing: Landing) -> None:
    gone = landing.put("modality/IM000003", make_instance())
    landing.direct.bucket(gone.bucket).blob(gone.name).delete()
    assert sniffed_skip_reason(landing.settings, landing.counted, gone) == "pattern"
    assert landing.calls() == {"objects.download": 1}


def test_cost_per_ignored_object(landing: Landing) -> None:
    """The number quoted in dicomflow/sniff.py: one ranged read per ignored object."""
    objects = [landing.put(f"sidecar/{i:03d}.json", not_dicom(200 + i)) for i in range(50)]
    reasons = {sniffed_skip_reason(landing.settings, landing.counted, o) for o in objects}
    assert reasons == {"pattern"}
    assert landing.calls() == {"objects.download": 50}
