"""The DICOM header check: ranged reads of the start of an object, parsed with pydicom.

``check(read, size)`` reads the first 64 KiB, and reads more (four times as
much each time, up to ``MAX_HEADER_BYTES``) only while the parse ran off the
end of what was read before finding the identifiers. Pixel data is never
read: pydicom stops before it. A file passes when it has:

- the 128-byte preamble followed by ``DICM``, and File Meta Information;
- a Transfer Syntax UID;
- valid Study, Series and SOP Instance UIDs, and a SOP Class UID;
- pixel data, if any, that does not run past the end of the object (checked
  from the element's length, or for encapsulated data from the object's last
  8 bytes, which must be the sequence delimiter);
- without pixel data, an end that is the end of its last data element: pydicom
  reads a cut value as a shorter one, so a cut UID would pass as a wrong one.

Otherwise ``NotDicomError`` carries a short reason code and detail; neither
ever holds a tag *value*, so reasons never carry PHI. Whatever pydicom raises
while parsing or reading a value (e.g. a damaged VR byte) is a rejection
(``unreadable``), never an error of the function: retrying cannot fix the
bytes. Only errors of the ranged read itself pass through.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filereader import read_partial
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from dicomflow.errors import NotDicomError

INITIAL_BYTES = 64 * 1024
MAX_HEADER_BYTES = 16 * 1024 * 1024
_PREAMBLE = 128

_TAGS = {
    "StudyInstanceUID": 0x0020000D,
    "SeriesInstanceUID": 0x0020000E,
    "SOPInstanceUID": 0x00080018,
    "SOPClassUID": 0x00080016,
}

# Reads bytes [start, end] (inclusive, like Blob.download_as_bytes) of the object.
RangeReader = Callable[[int, int], bytes]


@dataclass(frozen=True)
class Uids:
    """The DICOM identifiers the header check reads (no PHI)."""

    study: str
    series: str
    sop: str
    sopClass: str
    transferSyntax: str


class Rejected(NotDicomError):
    """The header check failed; ``code`` is stable, ``detail`` is for people."""

    def __init__(self, code: str, detail: str) -> None:
        self.code = code
        self.detail = detail
        super().__init__(f"{code}: {detail}")


def _parse(buf: bytes) -> tuple[Dataset | None, int, tuple[int, int] | None, Exception | None]:
    """Parse ``buf``; return (dataset, where the parse stopped, last element, error).

    The last element is the (value position, length) of the last top-level element
    met, pixel data excluded.
    """
    fp = BytesIO(buf)
    last: list[tuple[int, int]] = []

    def at_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
        if tag in _PIXEL_TAG_INTS:
            return True
        last[:] = [(fp.tell(), length)]
        return False

    try:
        ds = read_partial(fp, at_pixel_data, specific_tags=list(_TAGS.values()))
    except Exception as exc:  # pydicom raises many types on bad input
        return None, len(buf), None, exc
    return ds, fp.tell(), last[0] if last else None, None


# Fragments walked at most to find the end of encapsulated pixel data.
MAX_ITEMS = 64
_PIXEL_TAGS = {(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)}
_PIXEL_TAG_INTS = {group << 16 | element for group, element in _PIXEL_TAGS}
_LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}


def _pixels_cut_short(ds: Dataset, read: RangeReader, position: int, size: int) -> bool:
    """True when the pixel data element at ``position`` runs past the end of the object.

    Native pixel data: its declared length, one 12-byte read. Encapsulated: walk
    the item headers (8 bytes each, up to ``MAX_ITEMS``) to the delimiter.
    """
    if str(ds.file_meta.get("TransferSyntaxUID", "")) == DeflatedExplicitVRLittleEndian:
        return False  # positions refer to the inflated stream
    if position + 12 > size:
        return False  # the parse ended at the end of the object: no pixel data
    implicit, little = ds.original_encoding
    order = "<" if little else ">"
    head = read(position, position + 11)
    if len(head) < 12 or struct.unpack(f"{order}HH", head[:4]) not in _PIXEL_TAGS:
        return False
    if implicit or not head[4:6].isalpha():  # some writers drop the VR of pixel data
        length, start = struct.unpack(f"{order}I", head[4:8])[0], position + 8
    elif head[4:6] in _LONG_VRS:
        length, start = struct.unpack(f"{order}I", head[8:12])[0], position + 12
    else:
        length, start = struct.unpack(f"{order}H", head[6:8])[0], position + 8
    if length != 0xFFFFFFFF:
        return bool(start + length > size)
    item = start
    for _ in range(MAX_ITEMS):
        if item + 8 > size:
            return True
        group, element, item_length = struct.unpack(f"{order}HHI", read(item, item + 7))
        if (group, element) == (0xFFFE, 0xE0DD):
            return False
        if (group, element) != (0xFFFE, 0xE000) or item_length == 0xFFFFFFFF:
            return True
        item += 8 + item_length
    return False  # too many fragments to walk cheaply: leave it to the import


def _ends_inside_an_element(
    ds: Dataset, last: tuple[int, int] | None, stopped: int, size: int
) -> bool:
    """True when an object of ``size`` bytes, read whole, ends inside a data element.

    pydicom takes a value cut by the end of the file as a shorter value, skips an
    element cut short by seeking past the end, and stops quietly inside an element
    header. A UID cut that way is often still a valid, but wrong, UID. ``last`` is
    the (value position, length) of the last top-level element of the data set.
    """
    if stopped != size:
        # Past the end: a skipped element ran past it. Before: the parse stopped at the
        # pixel data, whose end _pixels_cut_short checks.
        return stopped > size
    meta = ds.file_meta
    meta_length = meta.get("FileMetaInformationGroupLength")
    # The group length counts the bytes after its own 12-byte element.
    if isinstance(meta_length, int) and _PREAMBLE + 4 + 12 + meta_length > size:
        return True
    if last is None or str(meta.get("TransferSyntaxUID", "")) == DeflatedExplicitVRLittleEndian:
        return False  # no data set element; or positions that refer to the inflated stream
    position, length = last
    return length != 0xFFFFFFFF and position + length != size


def _missing(ds: Dataset) -> list[str]:
    return [
        name for name, tag in _TAGS.items() if tag not in ds or not str(ds[tag].value or "").strip()
    ]


def check(read: RangeReader, size: int, initial: int = INITIAL_BYTES) -> Uids:
    """Check the header of an object of ``size`` bytes; return its UIDs.

    Raises:
        Rejected: the object is not an acceptable DICOM file (reason in ``code``). Any
            error of parsing or of reading a value (pydicom reads values lazily, so a
            damaged VR or length raises only then) is ``unreadable``, with the
            exception's type but not its message, which can quote values.
        Exception: errors of ``read`` (e.g. transient storage errors), unchanged.
    """
    read_errors: list[BaseException] = []

    def guarded(start: int, end: int) -> bytes:
        try:
            return read(start, end)
        except BaseException as exc:
            read_errors.append(exc)
            raise

    with warnings.catch_warnings():
        # Odd or truncated files make pydicom warn (also on lazy value access); we decide.
        warnings.simplefilter("ignore")
        try:
            return _check(guarded, size, initial)
        except Rejected:
            raise
        except Exception as exc:
            if any(exc is failed for failed in read_errors):
                raise
            raise Rejected(
                "unreadable", f"header values could not be read ({type(exc).__name__})"
            ) from None


def _check(read: RangeReader, size: int, initial: int) -> Uids:
    if size < _PREAMBLE + 4:
        raise Rejected("not-dicom", f"object of {size} bytes is too small for a DICOM file")
    length = min(size, initial)
    buf = read(0, length - 1)
    if buf[_PREAMBLE : _PREAMBLE + 4] != b"DICM":
        raise Rejected("not-dicom", "no DICM prefix after the 128-byte preamble")
    while True:
        ds, stopped, last, error = _parse(buf)
        ran_off = stopped >= len(buf)
        # Growing also when complete but ran off: where the pixel data starts is unknown.
        if not ran_off or len(buf) >= size or len(buf) >= MAX_HEADER_BYTES:
            break
        more = min(size, len(buf) * 4, MAX_HEADER_BYTES)
        buf += read(len(buf), more - 1)
    if ds is None:
        truncated = len(buf) >= size
        code = "truncated" if truncated else "unreadable"
        raise Rejected(code, f"header could not be parsed ({type(error).__name__})")
    if len(buf) >= size and _ends_inside_an_element(ds, last, stopped, size):
        raise Rejected("truncated", "the object ends inside a data element")
    meta = ds.file_meta
    if not meta:
        raise Rejected("no-file-meta", "File Meta Information is missing")
    syntax = str(meta.get("TransferSyntaxUID", "") or "")
    if not syntax:
        raise Rejected("no-transfer-syntax", "File Meta Information has no Transfer Syntax UID")
    missing = _missing(ds)
    if missing:
        raise Rejected("missing-uid", f"missing {', '.join(missing)}")
    uids = {name: str(ds[tag].value).strip() for name, tag in _TAGS.items()}
    for name in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if not UID(uids[name]).is_valid:
            raise Rejected("invalid-uid", f"{name} is not a valid UID")
    if not UID(syntax).is_valid:
        raise Rejected("no-transfer-syntax", "Transfer Syntax UID is not a valid UID")

    def read_known(start: int, end: int) -> bytes:
        return buf[start : end + 1] if end < len(buf) else read(start, end)

    if _pixels_cut_short(ds, read_known, stopped, size):
        raise Rejected("truncated", "the object ends before its pixel data does")
    return Uids(
        study=uids["StudyInstanceUID"],
        series=uids["SeriesInstanceUID"],
        sop=uids["SOPInstanceUID"],
        sopClass=uids["SOPClassUID"],
        transferSyntax=syntax,
    )
