"""The leak scan over logs and alerts finds what it looks for, and only that."""

from __future__ import annotations

from urllib.parse import quote

from localcloud import leaks
from localcloud.corpus import generate_instance

STUDY = "2.25.1234567890123456789"
NAME = "incoming/Roe^Richard MRN-9999/ct.dcm"


def test_markers_and_hits_per_kind() -> None:
    g = generate_instance(STUDY, "2.25.987654321987654321", 1, patient_name="Roe^Richard")
    markers = leaks.corpus_markers([(NAME, g.data), ("broken.dcm", b"not dicom at all")])
    assert markers.counts() == {
        "PatientBirthDate": 1,
        "PatientID": 1,
        "PatientName": 2,
        "SOPInstanceUID": 1,
        "SeriesInstanceUID": 1,
        "StudyInstanceUID": 1,
        "object name": 3,
    }
    clean = ['{"message": "staged", "object": "h:0123abcd:' + "0" * 32 + '"}', "Roe^Richardson"]
    assert leaks.scan(clean, markers, "logs") == []
    dirty = [
        "ok",
        f"GET /b/land/o/{quote(NAME, safe='')}",
        f"qido {g.sop_uid.upper()} for RICHARD",
        "born 19700101",
    ]
    found = leaks.scan(dirty, markers, "logs")
    assert sorted(line.split(" values")[0] for line in found) == [
        "1 PatientBirthDate",
        "1 PatientName",
        "1 SOPInstanceUID",
        "1 object name",
    ]
    assert "logs line 2" in next(line for line in found if "object name" in line)
