"""Real and generated DICOM sample data for the demo, the tests and the benchmarks.

Real files: pydicom's bundled ``data/test_files`` and the ``pydicom-data``
package (module ``data_store``), found by globbing their folders; pydicom's
``get_testdata_files`` would try to download the rest. Some of those files are
broken on purpose, which is what the pipeline must cope with.

Generated files: small valid Part 10 instances, grouped into studies and
series, with synthetic patient names that tests look for in logs and alerts.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
# Under the 2.25 root: UUID-derived UIDs are valid without an org root.
UID_PREFIX = "2.25."


def sample_files() -> list[Path]:
    """Every file of pydicom's test data and of pydicom-data, sorted."""
    roots = [Path(pydicom.__file__).parent / "data" / "test_files"]
    try:
        import data_store

        roots.append(Path(data_store.__file__).parent / "data")
    except ImportError:  # pydicom-data is a dev dependency; the demo still runs without it
        pass
    files = [p for root in roots for p in root.rglob("*") if p.is_file()]
    return sorted(
        f for f in files if f.suffix.lower() not in (".py", ".pyc", ".json", ".txt", ".md")
    )


@dataclass(frozen=True)
class Generated:
    """A generated instance: its bytes and UIDs."""

    data: bytes
    study_uid: str
    series_uid: str
    sop_uid: str


def generate_instance(
    study_uid: str,
    series_uid: str,
    number: int,
    patient_name: str = "DEMO^PATIENT",
    patient_id: str = "DEMO-0001",
    rows: int = 8,
    columns: int = 8,
    frames: int = 1,
) -> Generated:
    """One small CT instance, explicit VR little endian, with 16-bit pixel data."""
    sop_uid = generate_uid(prefix=UID_PREFIX)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.StudyDate = "20261125"
    ds.Modality = "CT"
    ds.AccessionNumber = "ACC0001"
    ds.InstanceNumber = number
    ds.SeriesNumber = 1
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = bytes((number + i) % 256 for i in range(rows * columns * 2 * frames))
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return Generated(buffer.getvalue(), study_uid, series_uid, sop_uid)


def generate_studies(
    studies: int, series_per_study: int, instances_per_series: int, **kwargs: object
) -> Iterator[Generated]:
    """Instances of ``studies`` x ``series_per_study`` x ``instances_per_series``."""
    for _ in range(studies):
        study_uid = generate_uid(prefix=UID_PREFIX)
        for _ in range(series_per_study):
            series_uid = generate_uid(prefix=UID_PREFIX)
            for number in range(1, instances_per_series + 1):
                yield generate_instance(study_uid, series_uid, number, **kwargs)  # type: ignore[arg-type]
