"""The emulator's fast header check agrees with the full pydicom read on real files."""

from __future__ import annotations

import io
import json
import pickle
import warnings

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.uid import ImplicitVRLittleEndian, generate_uid

from localcloud.corpus import generate_instance, sample_files
from localcloud.healthcare import instances, lean

FILES = sample_files()


def _instance() -> bytes:
    return generate_instance(generate_uid(), generate_uid(), 1).data


def _fast(data: bytes) -> tuple[str, str, dict[str, object]] | None:
    return lean.parse(data, instances._INDEX_TAGS, instances._fast_json, instances.is_valid_uid)


def test_the_fast_path_takes_most_sample_files_and_agrees_with_pydicom_on_each() -> None:
    taken = 0
    for path in FILES:
        data = path.read_bytes()
        if _fast(data) is None:
            continue
        taken += 1
        # Whatever the fast path accepts, the full read accepts with the same index entry.
        assert instances.parse_instance(data) == instances.parse_with_pydicom(data), path.name
    assert taken >= len(FILES) // 2


@pytest.mark.parametrize("cut", [200, 400, -100, -1])
def test_a_truncated_file_is_left_to_pydicom(cut: int) -> None:
    data = _instance()
    assert _fast(data) is not None
    assert _fast(data[:cut]) is None


def test_implicit_vr_and_invalid_uids() -> None:
    dataset = pydicom.dcmread(io.BytesIO(_instance()))
    buffer = io.BytesIO()
    dataset.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    dataset.save_as(buffer, enforce_file_format=True)
    implicit = buffer.getvalue()
    assert _fast(implicit) is not None
    assert instances.parse_instance(implicit) == instances.parse_with_pydicom(implicit)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset.StudyInstanceUID = "a" * 64
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
    assert _fast(buffer.getvalue()) is None
    with pytest.raises(instances.InstanceRejected, match="StudyInstanceUID is not a valid UID"):
        instances.parse_instance(buffer.getvalue())


def test_fast_element_conversion_matches_pydicom_on_every_indexed_sample_value() -> None:
    compared = 0
    for path in FILES:
        data = path.read_bytes()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dataset = pydicom.dcmread(io.BytesIO(data))
        except Exception:
            continue  # broken on purpose; the header check rejects those
        for tag in instances._INDEX_TAGS:
            raw = dataset.get_item(tag) if tag in dataset else None
            if not isinstance(raw, RawDataElement):
                continue
            fast = instances._fast_json(raw)
            if fast is None:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                assert fast == dataset[tag].to_json_dict(None, 1024), (path.name, hex(tag))
            compared += 1
    assert compared > 1000


def test_a_parsed_instance_travels_as_its_index_json() -> None:
    # Import workers pickle what they parsed; the emulator writes the JSON text as it comes.
    parsed = instances.parse_instance(_instance())
    copy = pickle.loads(pickle.dumps(parsed, protocol=pickle.HIGHEST_PROTOCOL))
    assert copy == parsed
    assert copy.attributes_json == json.dumps(parsed.attributes)
    assert copy.attributes == parsed.attributes
    assert copy.text("PatientID") == parsed.text("PatientID") != ""
    assert copy != instances.parse_instance(_instance())
