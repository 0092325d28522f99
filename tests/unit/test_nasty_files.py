"""A corpus of nasty files and object names, each with the exact outcome it must get.

Files: zero bytes, random bytes, a valid preamble with garbage after it, real
headers cut at every 64-byte step, and a 2 GB sparse file. Names: wildcard
characters, ``../``, newlines and unicode, which the event decoder and the filter
must classify and which must never reach a log line.
"""

from __future__ import annotations

import io
import json
import logging
import random
from dataclasses import dataclass
from functools import cache
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.filereader import data_element_generator

from dicomflow import header, ingest, log, runtime
from dicomflow.events import StorageObject, skip_reason
from tests.ingest_support import make_instance, make_settings

STUDY, SERIES, SOP = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2", "1.2.3.4.5"


def classify(data: bytes, initial: int = header.INITIAL_BYTES) -> str:
    """``accepted`` or the rejection code."""
    try:
        header.check(lambda start, end: data[start : end + 1], len(data), initial)
    except header.Rejected as rejected:
        return rejected.code
    return "accepted"


# ---- zero, random, and garbage after a valid preamble ---------------------------------------


def test_zero_bytes() -> None:
    assert classify(b"") == "not-dicom"


@pytest.mark.parametrize("size", [1, 131, 132, 133, 4096, 70_000])
def test_random_bytes(size: int) -> None:
    data = random.Random(size).randbytes(size)
    assert classify(data) == "not-dicom"
    assert classify(data, initial=256) == "not-dicom"


PREAMBLE = b"\0" * 128 + b"DICM"


@pytest.mark.parametrize(
    ("rest", "code"),
    [
        (b"", "no-file-meta"),
        (b"\0" * 8, "no-file-meta"),
        (b"\xff" * 64, "no-file-meta"),  # group FFFF: no group 2 at all
        (b"DICM" * 100, "truncated"),  # read as elements whose lengths run past the end
        # A group length, then nothing: the File Meta Information is cut short.
        (b"\x02\x00\x00\x00UL\x04\x00\x9a\x00\x00\x00", "truncated"),
        # A group length of 0 (nothing else in the group), then a data set.
        (
            b"\x02\x00\x00\x00UL\x04\x00\x00\x00\x00\x00\x08\x00\x60\x00CS\x02\x00OT",
            "no-transfer-syntax",
        ),
    ],
)
def test_garbage_after_a_valid_preamble(rest: bytes, code: str) -> None:
    assert classify(PREAMBLE + rest) == code


@pytest.mark.parametrize("seed", range(8))
def test_random_garbage_after_a_valid_preamble(seed: int) -> None:
    rng = random.Random(seed)
    data = PREAMBLE + rng.randbytes(rng.choice([1, 7, 64, 1000, 70_000]))
    assert classify(data) in {"no-file-meta", "truncated", "unreadable", "no-transfer-syntax"}
    assert classify(data) == classify(data, initial=200)


# ---- real headers cut at every 64-byte step ---------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where the top-level parts of a file end: what a cut at each offset must give."""

    data_set: int  # where the File Meta Information ends
    boundaries: frozenset[int]  # where a top-level element ends (or the data set starts)
    uids_end: int  # where the last of the four required UIDs ends
    pixels: tuple[int, int]  # where the pixel data element starts and ends

    def expected(self, cut: int) -> str:
        """The one classification the header check must give the first ``cut`` bytes."""
        start, end = self.pixels
        if cut < 132:
            return "not-dicom"
        if cut < self.data_set:
            return "truncated"
        if start < cut < end:
            return "truncated"  # inside the pixel data
        if cut >= end:
            return "accepted"  # what follows the pixel data is never read
        if cut not in self.boundaries:
            return "truncated"  # inside an element
        # At an element boundary the file looks complete, just without the rest.
        return "accepted" if cut >= self.uids_end else "missing-uid"


def layout(data: bytes) -> Layout:
    meta = dcmread(BytesIO(data), stop_before_pixels=True).file_meta
    data_set = 132 + 12 + meta.FileMetaInformationGroupLength
    syntax = meta.TransferSyntaxUID
    fp = BytesIO(data)
    fp.seek(data_set)
    boundaries, uids_end, pixels = {data_set}, 0, (len(data), len(data))
    for element in data_element_generator(fp, syntax.is_implicit_VR, syntax.is_little_endian):
        end = fp.tell()
        if element.tag in (0x00080016, 0x00080018, 0x0020000D, 0x0020000E):
            uids_end = max(uids_end, end)
        if element.tag == 0x7FE00010:
            pixels = (max(b for b in boundaries if b < end), end)
        boundaries.add(end)
    return Layout(data_set, frozenset(boundaries), uids_end, pixels)


@cache
def real(name: str) -> bytes:
    if name == "generated":
        return make_instance(STUDY, SERIES, SOP, rows=24)
    return Path(str(get_testdata_file(name))).read_bytes()


CUT_FILES = ["generated", "CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm"]


def cuts(name: str) -> list[int]:
    return list(range(0, len(real(name)), 64))


@pytest.mark.parametrize("name", CUT_FILES)
def test_real_header_cut_at_every_64_bytes(name: str) -> None:
    data = real(name)
    where = layout(data)
    assert classify(data) == "accepted"
    got = {cut: classify(data[:cut]) for cut in cuts(name)}
    expected = {cut: where.expected(cut) for cut in cuts(name)}
    assert got == expected


def test_the_cuts_meet_every_class() -> None:
    """The layout model is exercised in every branch, not just agreed with."""
    layouts = {name: layout(real(name)) for name in CUT_FILES}
    classes = {layouts[name].expected(cut) for name in CUT_FILES for cut in cuts(name)}
    assert classes == {"not-dicom", "truncated", "missing-uid", "accepted"}


def test_a_cut_inside_a_uid_is_not_taken_for_a_shorter_uid() -> None:
    """pydicom reads a cut value as a shorter, valid UID; the check calls it truncated."""
    data = real("generated")
    end = data.index(SERIES.encode()) + len(SERIES)
    for cut in range(end - len(SERIES) + 1, end):  # "1", "1.", "1.2", ...
        assert classify(data[:cut]) == "truncated", cut


def test_the_cut_model_on_the_generated_file() -> None:
    """The model itself, on offsets read off the generated file by hand."""
    data = real("generated")
    where = layout(data)
    series_value = data.index(SERIES.encode())
    assert where.uids_end == series_value + len(SERIES) + 1  # UIDs are padded to even length
    assert where.expected(series_value + 3) == "truncated"
    assert where.expected(where.uids_end) == "accepted"
    assert where.expected(where.pixels[0]) == "accepted"
    assert where.expected(where.pixels[0] + 1) == "truncated"
    assert where.expected(where.data_set) == "missing-uid"


# ---- a 2 GB sparse file ------------------------------------------------------------------------


class FileReader:
    """A RangeReader over a local file that counts what it reads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.read_bytes = 0

    def __call__(self, start: int, end: int) -> bytes:
        with self.path.open("rb") as f:
            f.seek(start)
            chunk = f.read(end - start + 1)
        self.read_bytes += len(chunk)
        return chunk


TWO_GB = 2 * 1024**3


def sparse(path: Path, head: bytes) -> Path:
    with path.open("wb") as f:
        f.write(head)
        f.truncate(TWO_GB)  # a hole: no disk used, reads as zeros
    return path


def test_a_2_gb_sparse_file_is_checked_from_its_first_64_kib(tmp_path: Path) -> None:
    path = sparse(tmp_path / "big.dcm", real("generated"))
    reader = FileReader(path)
    uids = header.check(reader, path.stat().st_size)
    assert (uids.study, uids.series, uids.sop) == (STUDY, SERIES, SOP)
    assert reader.read_bytes <= header.INITIAL_BYTES < 1024 * 1024


def test_a_2_gb_sparse_file_without_pixel_data_reads_at_most_the_cap(tmp_path: Path) -> None:
    """A header without pixel data, then 2 GB of zeros: reads stop at the cap.

    pydicom reads the zeros as empty (0000,0000) elements, so the parse never ends
    by itself; the check reads ``MAX_HEADER_BYTES`` (and the 12 bytes where pixel
    data would start) and decides on the UIDs it found.
    """
    data = real("generated")
    path = sparse(tmp_path / "zeros.dcm", data[: layout(data).pixels[0]])
    reader = FileReader(path)
    uids = header.check(reader, path.stat().st_size)
    assert (uids.study, uids.series, uids.sop) == (STUDY, SERIES, SOP)
    assert reader.read_bytes <= header.MAX_HEADER_BYTES + 12


# ---- nasty object names ---------------------------------------------------------------------

# (name, skip reason of the default filter) -- every name carries NASTY, which must not be logged.
NASTY_NAMES = [
    ("in/NASTY*?[a-z]\\x.dcm", None),
    ("in/**/NASTY.dcm", None),
    ("../NASTY.dcm", None),
    ("in/../../etc/NASTY.dcm", None),
    ("in/./NASTY%2e%2e/x.dcm", None),
    ("in/NASTY\nline.dcm", None),
    ("in/NASTY\r\n.dcm", None),
    ("in/NASTY.dcm\n", "pattern"),
    ("in/NASTY Müller Ωmega 患者 \u2028.DCM", None),
    ("in/NASTY\x00.dcm", None),
    ("in/NASTY/", "folder"),
    ("in/NASTY.txt", "pattern"),
    ("NASTY" + "x" * 1100 + ".dcm", None),
]


@pytest.mark.parametrize(("name", "reason"), NASTY_NAMES)
def test_nasty_names_are_decoded_and_filtered(name: str, reason: str | None) -> None:
    settings = make_settings("landing", "staging")
    obj = StorageObject.from_data({"bucket": "landing", "name": name, "generation": "7"})
    assert obj.name == name  # kept exactly: it is the key to the object
    assert skip_reason(settings, obj) == (reason or "empty")  # no size given: empty
    sized = StorageObject.from_data(
        {"bucket": "landing", "name": name, "generation": "7", "size": "10"}
    )
    assert skip_reason(settings, sized) == reason


@pytest.mark.parametrize("name", [name for name, reason in NASTY_NAMES if reason])
def test_skipped_nasty_names_are_logged_by_hash(name: str) -> None:
    settings = make_settings("landing", "staging")
    stream = io.StringIO()
    log.configure(logging.INFO, stream)
    obj = StorageObject.from_data(
        {"bucket": "landing", "name": name, "generation": "7", "size": "10"}
    )
    storage: Any = None  # a skipped object never reaches storage
    ctx = runtime.Context(settings=settings, storage=storage)
    result = ingest.ingest_object(ctx, obj, "event-1", None)
    assert result["status"] == "skipped"
    (line,) = stream.getvalue().rstrip("\n").split("\n")
    assert "NASTY" not in line
    assert json.loads(line)["object"].startswith("h:")
