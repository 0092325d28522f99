"""The DICOM header check: ranged reads of the start of an object, parsed with pydicom.

``check(read, size)`` reads the first 64 KiB, and reads more (four times as
much each time, up to ``MAX_HEADER_BYTES``) only while the parse ran off the
end of what was read before finding the identifiers. Pixel data is never
read: pydicom stops before it. A file passes when it has:

- the 128-byte preamble followed by ``DICM``, and File Meta Information;
- a Transfer Syntax UID;
- valid Study, Series and SOP Instance UIDs, and a SOP Class UID.

Otherwise ``NotDicomError`` carries a short reason code and detail; neither
ever holds a tag *value*, so reasons never carry PHI.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from io import BytesIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicomflow.errors import NotDicomError
from dicomflow.ledger import Uids

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


class Rejected(NotDicomError):
    """The header check failed; ``code`` is stable, ``detail`` is for people."""

    def __init__(self, code: str, detail: str) -> None:
        self.code = code
        self.detail = detail
        super().__init__(f"{code}: {detail}")


def _parse(buf: bytes) -> tuple[Dataset | None, bool, Exception | None]:
    """Parse ``buf``; return (dataset, ran past the end of buf, error)."""
    fp = BytesIO(buf)
    try:
        ds = dcmread(fp, stop_before_pixels=True, specific_tags=list(_TAGS.values()))
    except Exception as exc:  # pydicom raises many types on bad input
        return None, True, exc
    return ds, fp.tell() >= len(buf), None


def _missing(ds: Dataset) -> list[str]:
    return [
        name for name, tag in _TAGS.items() if tag not in ds or not str(ds[tag].value or "").strip()
    ]


def check(read: RangeReader, size: int, initial: int = INITIAL_BYTES) -> Uids:
    """Check the header of an object of ``size`` bytes; return its UIDs.

    Raises:
        Rejected: the object is not an acceptable DICOM file (reason in ``code``).
        Exception: errors of ``read`` (e.g. transient storage errors), unchanged.
    """
    with warnings.catch_warnings():
        # Odd or truncated files make pydicom warn (also on lazy value access); we decide.
        warnings.simplefilter("ignore")
        return _check(read, size, initial)


def _check(read: RangeReader, size: int, initial: int) -> Uids:
    if size < _PREAMBLE + 4:
        raise Rejected("not-dicom", f"object of {size} bytes is too small for a DICOM file")
    length = min(size, initial)
    buf = read(0, length - 1)
    if buf[_PREAMBLE : _PREAMBLE + 4] != b"DICM":
        raise Rejected("not-dicom", "no DICM prefix after the 128-byte preamble")
    while True:
        ds, ran_off, error = _parse(buf)
        missing = _missing(ds) if ds is not None else list(_TAGS)
        complete = not missing and (ds is not None and "TransferSyntaxUID" in ds.file_meta)
        if complete or not ran_off or len(buf) >= size or len(buf) >= MAX_HEADER_BYTES:
            break
        more = min(size, len(buf) * 4, MAX_HEADER_BYTES)
        buf += read(len(buf), more - 1)
    if ds is None:
        truncated = len(buf) >= size
        code = "truncated" if truncated else "unreadable"
        raise Rejected(code, f"header could not be parsed ({type(error).__name__})")
    meta = ds.file_meta
    if not meta:
        raise Rejected("no-file-meta", "File Meta Information is missing")
    syntax = str(meta.get("TransferSyntaxUID", "") or "")
    if not syntax:
        raise Rejected("no-transfer-syntax", "File Meta Information has no Transfer Syntax UID")
    if missing:
        raise Rejected("missing-uid", f"missing {', '.join(missing)}")
    uids = {name: str(ds[tag].value).strip() for name, tag in _TAGS.items()}
    for name in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if not UID(uids[name]).is_valid:
            raise Rejected("invalid-uid", f"{name} is not a valid UID")
    if not UID(syntax).is_valid:
        raise Rejected("no-transfer-syntax", "Transfer Syntax UID is not a valid UID")
    return Uids(
        study=uids["StudyInstanceUID"],
        series=uids["SeriesInstanceUID"],
        sop=uids["SOPInstanceUID"],
        sopClass=uids["SOPClassUID"],
        transferSyntax=syntax,
    )
