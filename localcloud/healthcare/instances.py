"""DICOM instances: the header check and index entry made on import and STOW,
and the renderings that export and WADO-RS produce.

Import stores the bytes exactly as received. Only the few attributes searches
need are converted to DICOM JSON; the rest of the file is walked raw, which is
also what lets a truncated file be told apart from a valid one.
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID

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


@dataclass(frozen=True)
class ParsedInstance:
    """What the index keeps of one valid instance."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    attributes: dict[str, Any]

    def text(self, keyword: str) -> str:
        """The first value of an indexed attribute as text ('' when absent)."""
        element = self.attributes.get(tag_hex(keyword))
        if not element or not element.get("Value"):
            return ""
        value = element["Value"][0]
        if isinstance(value, dict):
            return str(value.get("Alphabetic", ""))
        return str(value)


def _is_truncated(dataset: Dataset, data_length: int) -> bool:
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
    if "PixelData" in dataset and syntax is not None and not UID(syntax).is_compressed:
        pixel_data = dataset.get_item("PixelData")
        value = pixel_data.value if isinstance(pixel_data, RawDataElement | DataElement) else None
        if isinstance(value, bytes):
            try:
                expected = int(get_expected_length(dataset))
            except (AttributeError, KeyError, TypeError, ValueError):
                return False
            return len(value) < expected
    return False


def parse_instance(data: bytes) -> ParsedInstance:
    """Check that ``data`` is a whole DICOM Part 10 file and build its index entry.

    Raises:
        InstanceRejected: not DICOM, truncated, or a required UID is missing.
    """
    if len(data) < 132 or data[128:132] != b"DICM":
        raise InstanceRejected(NOT_DICOM)
    with quiet_pydicom():
        try:
            dataset = pydicom.dcmread(io.BytesIO(data))
            syntax = dataset.file_meta.get("TransferSyntaxUID")
            if not syntax or _is_truncated(dataset, len(data)):
                raise InstanceRejected(NOT_DICOM)
            uids = [
                str(dataset.get(k, "") or "").strip()
                for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
            ]
            sop_class = str(
                dataset.get("SOPClassUID", "")
                or dataset.file_meta.get("MediaStorageSOPClassUID", "")
            )
            attributes: dict[str, Any] = {}
            for keyword in INDEX_KEYWORDS:
                if keyword in dataset:
                    try:
                        element = dataset[keyword]
                        attributes[f"{element.tag:08X}"] = element.to_json_dict(None, 1024)
                    except Exception:
                        # A malformed optional attribute is left out of the index, as
                        # a store keeps the file but cannot search on that value.
                        continue
        except InstanceRejected:
            raise
        except Exception:
            # pydicom raises many kinds of errors on damaged files; all mean the same here.
            raise InstanceRejected(NOT_DICOM) from None
    missing = [
        k
        for k, v in zip(
            ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"), uids, strict=True
        )
        if not v
    ]
    if missing:
        raise InstanceRejected(f"invalid DICOM instance: missing {', '.join(missing)}")
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
