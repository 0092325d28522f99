"""A fast path for the header check of plain, whole DICOM files.

``pydicom.dcmread`` builds a Dataset of every element, which costs most of an
import's parse time for a small file. This walks the Part 10 bytes with
``struct`` instead: the file meta, then the top-level elements of an implicit
or explicit VR little endian dataset, skipping sequences and encapsulated pixel
data item by item. It only ever says "valid": anything it does not handle, or
that looks wrong (a truncated element, an odd VR, a value that needs
pydicom's conversion, a missing or invalid UID), returns None, and the
pydicom path in ``instances.parse_instance`` decides. A unit test checks that
the two agree on every sample file the fast path accepts.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from pydicom.dataelem import RawDataElement
from pydicom.tag import BaseTag

_UNPACK_TAG_LENGTH = struct.Struct("<HHL").unpack_from
_UNPACK_EXPLICIT = struct.Struct("<HH2sH").unpack_from
_UNPACK_LONG = struct.Struct("<L").unpack_from
# Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 section 7.1.2).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_IMPLICIT_LE = "1.2.840.10008.1.2"
# Syntaxes whose dataset is explicit VR little endian (not deflated, not big endian).
_EXPLICIT_LE_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.81",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.5",
    }
)
_COMPRESSED = _EXPLICIT_LE_SYNTAXES - {"1.2.840.10008.1.2.1"}
_PIXEL_DATA = 0x7FE00010
_PLAIN_PHOTOMETRIC = frozenset({b"MONOCHROME1", b"MONOCHROME2", b"RGB", b"PALETTE COLOR"})


class _Unsure(Exception):
    """The fast path cannot decide; pydicom will."""


def _element_header(data: bytes, pos: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, VR or None, value length, value offset) of the element at ``pos``."""
    if pos + 8 > len(data):
        raise _Unsure
    if implicit:
        group, element, length = _UNPACK_TAG_LENGTH(data, pos)
        return (group << 16) | element, None, length, pos + 8
    group, element, vr, short_length = _UNPACK_EXPLICIT(data, pos)
    tag = (group << 16) | element
    if group == 0xFFFE:  # items and delimiters have no VR
        return tag, None, _UNPACK_LONG(data, pos + 4)[0], pos + 8
    if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
        raise _Unsure
    if vr in _LONG_VRS:
        if pos + 12 > len(data):
            raise _Unsure
        return tag, vr, _UNPACK_LONG(data, pos + 8)[0], pos + 12
    return tag, vr, short_length, pos + 8


def _skip_sequence(data: bytes, pos: int, implicit: bool, depth: int) -> int:
    """The offset after an undefined-length sequence (or encapsulated data) starting at ``pos``."""
    if depth > 32:
        raise _Unsure
    while True:
        tag, _vr, length, value = _element_header(data, pos, True)
        if tag == _SEQUENCE_END:
            return value
        if tag != _ITEM:
            raise _Unsure
        if length != _UNDEFINED:
            pos = value + length
            if pos > len(data):
                raise _Unsure
            continue
        pos = value
        while True:  # an undefined-length item: its elements, then an item delimiter
            tag, _vr, length, value = _element_header(data, pos, implicit)
            if tag == _ITEM_END:
                pos = value
                break
            pos = _skip_value(data, value, length, implicit, depth + 1)


def _skip_value(data: bytes, value: int, length: int, implicit: bool, depth: int) -> int:
    if length == _UNDEFINED:
        return _skip_sequence(data, value, implicit, depth)
    end = value + length
    if end > len(data):
        raise _Unsure  # cut short: pydicom decides how
    return end


def _text(raw: bytes) -> str:
    text = raw.rstrip(b" \x00")
    if not text or not text.isascii():
        raise _Unsure
    return text.decode("ascii")


def parse(
    data: bytes,
    index_tags: tuple[int, ...],
    fast_json: Callable[[RawDataElement], dict[str, Any] | None],
    valid_uid: Callable[[str], bool],
) -> tuple[str, str, dict[str, Any]] | None:
    """(transfer syntax, SOP class from the meta, index attributes), or None when unsure.

    ``index_tags`` are the attributes to index, ``fast_json`` converts one raw
    element (None when it cannot) and ``valid_uid`` is the store's UID rule.
    """
    try:
        return _parse(data, index_tags, fast_json, valid_uid)
    except (_Unsure, struct.error, UnicodeDecodeError):
        return None


def _parse(
    data: bytes,
    index_tags: tuple[int, ...],
    fast_json: Callable[[RawDataElement], dict[str, Any] | None],
    valid_uid: Callable[[str], bool],
) -> tuple[str, str, dict[str, Any]] | None:
    if len(data) < 132 or data[128:132] != b"DICM":
        return None
    pos, syntax, meta_class = 132, "", ""
    while pos + 8 <= len(data) and data[pos : pos + 2] == b"\x02\x00":
        tag, vr, length, value = _element_header(data, pos, False)
        if vr is None or length == _UNDEFINED or value + length > len(data):
            return None
        if tag == 0x00020010:
            syntax = _text(data[value : value + length])
        elif tag == 0x00020002:
            meta_class = _text(data[value : value + length])
        pos = value + length
    if syntax == _IMPLICIT_LE:
        implicit = True
    elif syntax in _EXPLICIT_LE_SYNTAXES:
        implicit = False
    else:
        return None
    found: dict[int, RawDataElement] = {}
    wanted = {*index_tags, 0x00280002, 0x00280004, _PIXEL_DATA}
    while pos < len(data):
        tag, vr, length, value = _element_header(data, pos, implicit)
        if tag >> 16 == 0x0002 or tag >> 16 == 0xFFFE:
            return None  # meta elements in the dataset, or a stray item: leave it to pydicom
        end = _skip_value(data, value, length, implicit, 0)
        if tag in wanted:
            if tag in found:
                return None
            raw_value = data[value:end] if length != _UNDEFINED else None
            found[tag] = RawDataElement(
                BaseTag(tag), vr.decode() if vr else None, length, raw_value, value, implicit, True
            )
        pos = end
    attributes: dict[str, Any] = {}
    for tag in index_tags:
        raw = found.get(tag)
        if raw is None:
            continue
        element = fast_json(raw)
        if element is None:
            return None
        attributes[f"{tag:08X}"] = element
    if not _pixels_whole(found, attributes, syntax):
        return None
    for key in ("0020000D", "0020000E", "00080018"):
        values = attributes.get(key, {}).get("Value")
        if not values or not valid_uid(str(values[0])):
            return None
    return syntax, meta_class, attributes


def _pixels_whole(
    found: dict[int, RawDataElement], attributes: dict[str, Any], syntax: str
) -> bool:
    """True when native pixel data is as long as the header says (or there is none)."""
    pixels = found.get(_PIXEL_DATA)
    if pixels is None or syntax in _COMPRESSED:
        return True
    if pixels.value is None:
        return False  # undefined length in a native syntax: unusual, pydicom decides

    def first(key: str, default: int | None) -> int | None:
        values = attributes.get(key, {}).get("Value")
        if not values:
            return default
        return values[0] if isinstance(values[0], int) else None

    samples_raw = found.get(0x00280002)
    samples_json = None if samples_raw is None else _samples(samples_raw)
    photometric = found.get(0x00280004)
    plain = (
        photometric is not None
        and photometric.value is not None
        and photometric.value.rstrip(b" \x00") in _PLAIN_PHOTOMETRIC
    )
    rows, columns = first("00280010", None), first("00280011", None)
    bits, frames = first("00280100", None), first("00280008", 1)
    if not plain or samples_json is None or None in (rows, columns, bits, frames):
        return False
    if bits not in (8, 16, 32, 64):
        return False
    assert rows is not None and columns is not None and bits is not None and frames is not None
    return len(pixels.value) >= rows * columns * samples_json * frames * (bits // 8)


def _samples(raw: RawDataElement) -> int | None:
    if raw.value is None or len(raw.value) != 2:
        return None
    return int.from_bytes(raw.value, "little")
