"""Coverage-guided fuzzing of the DICOM header check with atheris (libFuzzer).

Run from the repository root, with any libFuzzer flags::

    .venv/bin/python tests/fuzz/fuzz_header.py -runs=100000
    .venv/bin/python tests/fuzz/fuzz_header.py -max_total_time=600 corpus/

Every input must end in ``Uids`` or ``header.Rejected``; any other exception is a
crash that libFuzzer reports, with the input saved as ``crash-<sha1>``. The first
byte picks the shape of the object: the input as it is, a valid preamble and
``DICM`` followed by the input, or a real header (pydicom's ``CT_small.dcm``)
with bytes overwritten, inserted and cut where the input says.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports(include=["dicomflow", "pydicom"]):
    from dicomflow import header

from pydicom.data import get_testdata_file

REAL = Path(str(get_testdata_file("CT_small.dcm"))).read_bytes()
PREAMBLE = b"\0" * 128 + b"DICM"
# The 64 KiB default reads a small object whole; a small first range exercises growing.
INITIALS = (header.INITIAL_BYTES, 512, 200)


def mutate_real(fdp: atheris.FuzzedDataProvider) -> bytes:
    """The real header, changed where the input says (edits stay in its first 4 KiB)."""
    data = bytearray(REAL)
    for _ in range(fdp.ConsumeIntInRange(1, 8)):
        where = fdp.ConsumeIntInRange(0, min(4095, len(data) - 1))
        kind = fdp.ConsumeIntInRange(0, 3)
        if kind == 0:
            data[where] = fdp.ConsumeInt(1) & 0xFF
        elif kind == 1:
            data[where:where] = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 8))
        elif kind == 2:
            del data[where : where + fdp.ConsumeIntInRange(1, 8)]
        else:
            del data[where + 132 :]
    return bytes(data)


def test_one_input(raw: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(raw)
    shape = fdp.ConsumeIntInRange(0, 2)
    initial = INITIALS[fdp.ConsumeIntInRange(0, len(INITIALS) - 1)]
    if shape == 0:
        data = fdp.ConsumeBytes(fdp.remaining_bytes())
    elif shape == 1:
        data = PREAMBLE + fdp.ConsumeBytes(fdp.remaining_bytes())
    else:
        data = mutate_real(fdp)
    try:
        uids = header.check(lambda start, end: data[start : end + 1], len(data), initial)
    except header.Rejected as rejected:
        if not rejected.code or not rejected.detail:
            raise AssertionError("a rejection without a reason") from None
        return
    for value in (uids.study, uids.series, uids.sop, uids.sopClass, uids.transferSyntax):
        if not isinstance(value, str) or not value:
            raise AssertionError("accepted with an empty UID")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
