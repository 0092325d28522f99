"""DICOM instances: the header check and index entry made on import and STOW,
and the renderings that export and WADO-RS produce.

Import stores the bytes exactly as received. Only the few attributes searches
need are converted to DICOM JSON; the rest of the file is walked raw, which is
also what lets a truncated file be told apart from a valid one.
"""

from __future__ import annotations

import io
import json
import re
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID

from localcloud.healthcare import lean

NOT_DICOM = "not a DICOM file"
CHECKSUM_MISMATCH = (
    "An instance already exists in this DICOM Store with the same Study/Series/SOPInstance "
    "UID, but the DICOM files differ (checksum mismatch)"
)
# Transfer syntaxes an export or a retrieve can be asked to produce.
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
ENCODABLE = {
    EXPLICIT_LE: "explicit VR little endian",
    IMPLICIT_LE: "implicit VR little endian",
    DEFLATED: "deflated explicit VR little endian",
    "1.2.840.10008.1.2.5": "RLE lossless",
    "1.2.840.10008.1.2.4.80": "JPEG-LS lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 lossless",
}

STUDY_KEYWORDS = (
    "SpecificCharacterSet",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "StudyDescription",
)
SERIES_KEYWORDS = (
    "Modality",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "SeriesDate",
    "SeriesTime",
)
INSTANCE_KEYWORDS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceNumber",
    "Rows",
    "Columns",
    "BitsAllocated",
    "NumberOfFrames",
)
INDEX_KEYWORDS = STUDY_KEYWORDS + SERIES_KEYWORDS + INSTANCE_KEYWORDS


def tag_hex(keyword: str) -> str:
    """The 8-hex-digit DICOM JSON key of ``keyword``."""
    tag = pydicom.datadict.tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return f"{tag:08X}"


STUDY_TAGS = frozenset(tag_hex(k) for k in STUDY_KEYWORDS)
SERIES_TAGS = frozenset(tag_hex(k) for k in SERIES_KEYWORDS) | {tag_hex("StudyInstanceUID")}
INSTANCE_TAGS = frozenset(tag_hex(k) for k in INSTANCE_KEYWORDS)
_INDEX_TAGS = tuple(int(tag_hex(k), 16) for k in INDEX_KEYWORDS)

_PYDICOM_LOCK = threading.RLock()


@contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's warnings for the duration of a parse or render.

    A store must accept the odd files pydicom warns about. ``catch_warnings``
    swaps process-global state, so a lock keeps our threads from interleaving.
    """
    with _PYDICOM_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class InstanceRejected(Exception):
    """The file cannot be stored; ``code`` is the gRPC code of the per-file error."""

    def __init__(self, message: str, code: int = 3) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class ParsedInstance:
    """What the index keeps of one valid instance.

    Its attributes go between processes as the DICOM JSON text the index stores:
    an import worker sends that text, which the emulator writes as it is and
    decodes only when asked for ``attributes``.
    """

    __slots__ = (
        "_attributes",
        "_attributes_json",
        "series_uid",
        "sop_class_uid",
        "sop_uid",
        "study_uid",
        "transfer_syntax",
    )

    def __init__(
        self,
        study_uid: str,
        series_uid: str,
        sop_uid: str,
        sop_class_uid: str,
        transfer_syntax: str,
        attributes: dict[str, Any] | None = None,
        attributes_json: str | None = None,
    ) -> None:
        if attributes is None and attributes_json is None:
            raise ValueError("ParsedInstance needs its attributes or their JSON text")
        self.study_uid = study_uid
        self.series_uid = series_uid
        self.sop_uid = sop_uid
        self.sop_class_uid = sop_class_uid
        self.transfer_syntax = transfer_syntax
        self._attributes = attributes
        self._attributes_json = attributes_json

    @property
    def attributes(self) -> dict[str, Any]:
        """DICOM JSON of the indexed attributes, by 8-hex-digit tag."""
        if self._attributes is None:
            assert self._attributes_json is not None
            self._attributes = json.loads(self._attributes_json)
        return self._attributes

    @property
    def attributes_json(self) -> str:
        """``attributes`` as JSON text, as the index stores it."""
        if self._attributes_json is None:
            self._attributes_json = json.dumps(self._attributes)
        return self._attributes_json

    def _key(self) -> tuple[Any, ...]:
        uids = (self.study_uid, self.series_uid, self.sop_uid, self.sop_class_uid)
        return (*uids, self.transfer_syntax, self.attributes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ParsedInstance) and self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ParsedInstance{self._key()!r}"

    def __reduce__(self) -> tuple[Any, ...]:
        uids = (self.study_uid, self.series_uid, self.sop_uid, self.sop_class_uid)
        return (ParsedInstance, (*uids, self.transfer_syntax, None, self.attributes_json))

    def text(self, keyword: str) -> str:
        """The first value of an indexed attribute as text ('' when absent)."""
        element = self.attributes.get(tag_hex(keyword))
        if not element or not element.get("Value"):
            return ""
        value = element["Value"][0]
        if isinstance(value, dict):
            return str(value.get("Alphabetic", ""))
        return str(value)


_TEXT_VRS = frozenset({"AE", "CS", "DA", "TM", "DT", "SH", "LO", "UI", "AS"})
_PRINTABLE_ASCII = re.compile(rb"[ -~]+")
_INTEGER_STRING = re.compile(r"[+-]?[0-9]{1,10}")
_PLAIN_PHOTOMETRIC = frozenset({b"MONOCHROME1", b"MONOCHROME2", b"RGB", b"PALETTE COLOR"})


def _fast_json(raw: RawDataElement) -> dict[str, Any] | None:
    """The DICOM JSON of a plain raw element, or None when pydicom must convert it.

    Converting through pydicom costs most of the parse time of a small file. The
    plain cases (printable ASCII text with one value, unsigned shorts) give the
    same JSON when done by hand; a unit test compares both over the sample corpus.
    """
    vr = raw.VR or pydicom.datadict.dictionary_VR(raw.tag)
    value = raw.value
    if value is None:
        return None
    if vr == "US":
        if len(value) != 2:
            return None
        return {
            "vr": vr,
            "Value": [int.from_bytes(value, "little" if raw.is_little_endian else "big")],
        }
    if vr not in _TEXT_VRS and vr not in ("PN", "IS"):
        return None
    text = value.rstrip(b" \x00")
    if not text:
        return {"vr": vr}
    if text[0] == 0x20 or b"\\" in text or not _PRINTABLE_ASCII.fullmatch(text):
        return None
    decoded = text.decode("ascii")
    if vr == "PN":
        if "=" in decoded:
            return None
        return {"vr": vr, "Value": [{"Alphabetic": decoded}]}
    if vr == "IS":
        if not _INTEGER_STRING.fullmatch(decoded):
            return None
        return {"vr": vr, "Value": [int(decoded)]}
    return {"vr": vr, "Value": [decoded]}


def _element_json(dataset: Dataset, tag: int) -> dict[str, Any] | None:
    """The DICOM JSON of one top-level element (None when malformed)."""
    raw = dataset.get_item(tag)
    if isinstance(raw, RawDataElement):
        fast = _fast_json(raw)
        if fast is not None:
            return fast
    try:
        result: dict[str, Any] = dataset[tag].to_json_dict(None, 1024)
    except Exception:
        # A malformed optional attribute is left out of the index, as a store keeps
        # the file but cannot search on that value.
        return None
    return result


def _first_int(attributes: dict[str, Any], keyword: str, default: int | None) -> int | None:
    element = attributes.get(tag_hex(keyword))
    values = element.get("Value") if element else None
    if not values:
        return default
    return values[0] if isinstance(values[0], int) else None


def _expected_pixel_bytes(dataset: Dataset, attributes: dict[str, Any]) -> int | None:
    """Bytes of native pixel data the header promises; None when it cannot tell."""
    photometric = dataset.get_item(0x00280004)
    photometric_value = photometric.value if photometric is not None else None
    counts = [
        _first_int(attributes, "Rows", None),
        _first_int(attributes, "Columns", None),
        _first_int(attributes, "BitsAllocated", None),
        _first_int(attributes, "NumberOfFrames", 1),
    ]
    samples_raw = dataset.get_item(0x00280002)
    samples = None
    if isinstance(samples_raw, RawDataElement) and samples_raw.value is not None:
        samples_json = _fast_json(samples_raw)
        if samples_json and samples_json.get("Value"):
            samples = samples_json["Value"][0]
    plain = (
        isinstance(photometric_value, bytes)
        and photometric_value.rstrip(b" \x00") in _PLAIN_PHOTOMETRIC
    )
    rows, columns, bits, frames = counts
    if plain and None not in counts and isinstance(samples, int) and bits in (8, 16, 32, 64):
        assert rows is not None and columns is not None and bits is not None and frames
        return rows * columns * samples * frames * (bits // 8)
    try:
        return int(get_expected_length(dataset))
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def _is_truncated(dataset: Dataset, data_length: int, attributes: dict[str, Any]) -> bool:
    """True when a top-level element, or native pixel data, ends short of its length."""
    for tag in list(dataset.keys()):
        raw = dataset.get_item(tag)
        if isinstance(raw, RawDataElement):
            if raw.length == 0xFFFFFFFF:
                continue
            if raw.value is None:
                if raw.value_tell + raw.length > data_length:
                    return True
            elif len(raw.value) < raw.length:
                return True
    syntax = dataset.file_meta.get("TransferSyntaxUID")
    if 0x7FE00010 in dataset and syntax is not None and not UID(syntax).is_compressed:
        pixel_data = dataset.get_item(0x7FE00010)
        value = pixel_data.value if isinstance(pixel_data, RawDataElement | DataElement) else None
        if isinstance(value, bytes):
            expected = _expected_pixel_bytes(dataset, attributes)
            return expected is not None and len(value) < expected
    return False


# The rule is DICOM PS3.5 section 9.1: at most 64 characters, digit components
# separated by single periods. Google's DICOM conformance statement
# (cloud.google.com/healthcare-api/docs/dicom, "Store transaction") does not spell
# out its UID check, so this follows PS3.5 for the characters and length, and lets
# leading zeros inside a component pass: PS3.5 forbids them too, but many archives
# hold such UIDs and how the service treats them is not documented.
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def is_valid_uid(value: str) -> bool:
    """True for a UID the store accepts: digits and single periods, at most 64 characters."""
    return len(value) <= 64 and _UID.fullmatch(value) is not None


_UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def _text(attributes: dict[str, Any], keyword: str) -> str:
    """An indexed attribute's value as text, as the index keeps it ('' when absent).

    A multi-valued UID reads as its list, which is not a valid UID either.
    """
    element = attributes.get(tag_hex(keyword))
    values = element.get("Value") if element else None
    if not values:
        return ""
    return str(values[0] if len(values) == 1 else values).strip()


def parse_instance(data: bytes) -> ParsedInstance:
    """Check that ``data`` is a whole DICOM Part 10 file and build its index entry.

    Raises:
        InstanceRejected: not DICOM, truncated, or a required UID is missing.
    """
    if len(data) < 132 or data[128:132] != b"DICM":
        raise InstanceRejected(NOT_DICOM)
    quick = lean.parse(data, _INDEX_TAGS, _fast_json, is_valid_uid)
    if quick is not None:
        syntax, meta_class, found = quick
        study, series, sop = (_text(found, k) for k in _UID_KEYWORDS)
        sop_class = _text(found, "SOPClassUID") or meta_class
        return ParsedInstance(study, series, sop, sop_class, syntax, found)
    return parse_with_pydicom(data)


def parse_with_pydicom(data: bytes) -> ParsedInstance:
    """``parse_instance`` through a full pydicom read: the path that decides every rejection.

    Raises:
        InstanceRejected: not DICOM, truncated, or a required UID is missing or invalid.
    """
    if len(data) < 132 or data[128:132] != b"DICM":
        raise InstanceRejected(NOT_DICOM)
    with quiet_pydicom():
        try:
            dataset = pydicom.dcmread(io.BytesIO(data))
            syntax = dataset.file_meta.get("TransferSyntaxUID")
            attributes: dict[str, Any] = {}
            for tag in _INDEX_TAGS:
                if tag in dataset:
                    element = _element_json(dataset, tag)
                    if element is not None:
                        attributes[f"{tag:08X}"] = element
            if not syntax or _is_truncated(dataset, len(data), attributes):
                raise InstanceRejected(NOT_DICOM)
            uids = [_text(attributes, k) for k in _UID_KEYWORDS]
            sop_class = _text(attributes, "SOPClassUID") or str(
                dataset.file_meta.get("MediaStorageSOPClassUID", "")
            )
        except InstanceRejected:
            raise
        except Exception:
            # pydicom raises many kinds of errors on damaged files; all mean the same here.
            raise InstanceRejected(NOT_DICOM) from None
    missing = [k for k, v in zip(_UID_KEYWORDS, uids, strict=True) if not v]
    if missing:
        raise InstanceRejected(f"invalid DICOM instance: missing {', '.join(missing)}")
    for keyword, value in zip(_UID_KEYWORDS, uids, strict=True):
        if not is_valid_uid(value):
            raise InstanceRejected(f"invalid DICOM instance: {keyword} is not a valid UID")
    return ParsedInstance(uids[0], uids[1], uids[2], sop_class, str(syntax), attributes)


def read_dataset(data: bytes) -> Dataset:
    """The full dataset of a stored instance."""
    with quiet_pydicom():
        return pydicom.dcmread(io.BytesIO(data))


def full_json(data: bytes, bulk_uri: str) -> dict[str, Any]:
    """The DICOM JSON metadata of an instance; large binary values become BulkDataURIs."""

    def bulk(element: DataElement) -> str:
        return f"{bulk_uri}/bulkdata/{element.tag:08X}"

    with quiet_pydicom():
        dataset = pydicom.dcmread(io.BytesIO(data))
        result: dict[str, Any] = dataset.to_json_dict(1024, bulk, suppress_invalid_tags=True)
    return result


def transcode(data: bytes, syntax: str) -> bytes:
    """The instance re-encoded in ``syntax``; ``*`` or the stored syntax keeps the bytes.

    Raises:
        InstanceRejected: the syntax cannot be produced, or this file cannot be converted.
    """
    if syntax == "*":
        return data
    with quiet_pydicom():
        dataset = pydicom.dcmread(io.BytesIO(data))
        current = UID(str(dataset.file_meta.TransferSyntaxUID))
        if current == syntax:
            return data
        if syntax not in ENCODABLE:
            raise InstanceRejected(
                f"transfer syntax {syntax} is not supported by the emulator's export; "
                f"supported: *, {', '.join(ENCODABLE)}"
            )
        target = UID(syntax)
        try:
            if current.is_compressed:
                dataset.decompress(generate_instance_uid=False)
            if target.is_compressed:
                dataset.compress(target, generate_instance_uid=False)
            else:
                dataset.file_meta.TransferSyntaxUID = target
            out = io.BytesIO()
            dataset.save_as(out, enforce_file_format=True)
        except Exception as exc:
            # Missing codecs and unsupported conversions surface as many error types.
            raise InstanceRejected(
                f"cannot convert from {current} to {ENCODABLE[syntax]} ({syntax}): {exc}"
            ) from None
    return out.getvalue()


def _frames(dataset: Dataset) -> list[np.ndarray[Any, Any]]:
    if "PixelData" not in dataset:
        raise InstanceRejected("the instance has no pixel data to render")
    try:
        array = dataset.pixel_array
    except Exception as exc:
        # Unsupported compressions and damaged pixel data raise many error types.
        raise InstanceRejected(f"cannot decode the pixel data: {exc}") from None
    count = int(dataset.get("NumberOfFrames", 1) or 1)
    return list(array) if count > 1 else [array]


def frame_count(data: bytes) -> int:
    """How many frames the instance holds (1 for single-frame, 0 without pixel data)."""
    with quiet_pydicom():
        dataset = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    return int(dataset.get("NumberOfFrames", 1) or 1) if "Rows" in dataset else 0


def _to_8bit(frame: np.ndarray[Any, Any], photometric: str) -> np.ndarray[Any, Any]:
    values = frame.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    scaled = np.zeros_like(values) if high <= low else (values - low) * (255.0 / (high - low))
    if photometric == "MONOCHROME1":
        scaled = 255.0 - scaled
    return scaled.astype(np.uint8)


def render_frames(data: bytes, image_type: str, only: int | None = None) -> list[bytes]:
    """Each frame (or frame ``only``, 1-based) as ``image/jpeg`` or ``image/png`` bytes.

    Raises:
        InstanceRejected: no pixel data, or it cannot be decoded or the frame is out of range.
    """
    with quiet_pydicom():
        dataset = pydicom.dcmread(io.BytesIO(data))
        photometric = str(dataset.get("PhotometricInterpretation", ""))
        frames = _frames(dataset)
        if photometric == "PALETTE COLOR":
            from pydicom.pixels.processing import apply_color_lut

            frames = [apply_color_lut(f, dataset) for f in frames]
    if only is not None:
        if not 1 <= only <= len(frames):
            raise InstanceRejected(f"frame {only} does not exist; the instance has {len(frames)}")
        frames = [frames[only - 1]]
    images = []
    for frame in frames:
        pixels = _to_8bit(frame, photometric)
        if pixels.ndim == 3 and pixels.shape[-1] == 1:
            pixels = pixels[..., 0]
        image = Image.fromarray(pixels, "RGB" if pixels.ndim == 3 else "L")
        out = io.BytesIO()
        image.save(out, "JPEG" if image_type == "image/jpeg" else "PNG")
        images.append(out.getvalue())
    return images


def raw_pixels(data: bytes) -> bytes:
    """The pixel data of every frame, decoded, in native little endian byte order.

    Raises:
        InstanceRejected: no pixel data, or it cannot be decoded.
    """
    return b"".join(raw_frames(data))


def raw_frames(data: bytes) -> list[bytes]:
    """Each frame's decoded pixel data, native little endian.

    Raises:
        InstanceRejected: no pixel data, or it cannot be decoded.
    """
    with quiet_pydicom():
        dataset = pydicom.dcmread(io.BytesIO(data))
        frames = _frames(dataset)
    return [np.ascontiguousarray(f).astype(f.dtype.newbyteorder("<")).tobytes() for f in frames]
