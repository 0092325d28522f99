"""Scan the functions' logs and the alerts for what the uploaded corpus identifies.

The markers of a corpus are, per file: PatientName (whole and its parts),
PatientID, PatientBirthDate, the Study, Series and SOP Instance UIDs, and the
landing object name (as uploaded and percent-encoded). The demo and the chaos
run upload a corpus, then ``scan`` every line of the ``ingest``, ``report`` and
``export`` logs and every alert for them: a hit is a leak. Only what the
functions write is scanned; Cloud Audit Logs written by Google's services are
outside it.
"""

from __future__ import annotations

import io
import json
import warnings
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pydicom

FUNCTION_LOGS = ("ingest", "report", "export")
UID_ATTRIBUTES = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
PHI_ATTRIBUTES = ("PatientName", "PatientID", "PatientBirthDate")
# Values that sample files use as placeholders, not as anyone's name.
_PLACEHOLDERS = {
    *("NAME", "NONE", "ANONYMOUS", "ANONYMIZED", "TEST", "UNKNOWN", "PATIENT"),
    *("FIRST", "LAST", "FIRST NAME", "LAST NAME", "FIRSTNAME", "LASTNAME", "MODALITY"),
}


@dataclass(frozen=True)
class Markers:
    """Marker text -> what it is (``PatientName``, ``SOPInstanceUID``, ``object name`` ...)."""

    kinds: Mapping[str, str]

    def counts(self) -> dict[str, int]:
        """How many markers of each kind."""
        return dict(sorted(Counter(self.kinds.values()).items()))


def corpus_markers(files: Iterable[tuple[str, bytes]]) -> Markers:
    """The markers of ``(landing object name, bytes)`` pairs (unreadable files give names)."""
    found: dict[str, str] = {}
    for name, data in files:
        found[name] = "object name"
        found[quote(name, safe="")] = "object name"
        for kind, value in _attributes(data):
            parts = value.split("^") if kind == "PatientName" else []
            for text in (value, *parts):
                text = text.strip()
                if _specific(text, kind):
                    found.setdefault(text, kind)
    return Markers(found)


def _attributes(data: bytes) -> list[tuple[str, str]]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
            meta = getattr(ds, "file_meta", None)
            values = [(k, str(ds.get(k, "") or "")) for k in (*PHI_ATTRIBUTES, *UID_ATTRIBUTES)]
            if meta is not None:
                values.append(
                    ("SOPInstanceUID", str(meta.get("MediaStorageSOPInstanceUID", "") or ""))
                )
    except Exception:  # broken on purpose: a file pydicom cannot read has no markers
        return []
    return [(k, v) for k, v in values if v]


def _specific(value: str, kind: str) -> bool:
    """Long enough to identify someone or something rather than to occur by chance.

    Skipped: values with fewer than 4 letters or digits, numbers under 6 digits (they turn up in
    ports, sizes and tag numbers), UIDs under 10 characters (``1.2.3``), and the
    placeholder words sample files use.
    """
    if sum(c.isalnum() for c in value) < 4 or (value.isdigit() and len(value) < 6):
        return False
    if kind in UID_ATTRIBUTES and len(value) < 10:
        return False
    return value.upper() not in _PLACEHOLDERS


def function_log_lines(home: Path) -> list[str]:
    """Every line the three functions wrote under ``home/logs`` (stdout and stderr)."""
    lines: list[str] = []
    for function in FUNCTION_LOGS:
        path = home / "logs" / f"{function}.log"
        if path.exists():
            lines += path.read_text(errors="replace").splitlines()
    return lines


def alert_texts(alerts: Iterable[Mapping[str, Any]]) -> list[str]:
    """Each alert as the JSON text a subscriber reads."""
    return [json.dumps(a, sort_keys=True) for a in alerts]


def scan(texts: Iterable[str], markers: Markers, where: str) -> list[str]:
    """One problem line per kind of marker found in ``texts`` (none: no leak).

    A marker counts where it stands alone: not inside a longer word or number, case
    ignored. One ``find`` per marker over all the text, which is fast for thousands of
    markers and lines alike.
    """
    lines = list(texts)
    text = "\n".join(lines).lower()
    starts = list(accumulate((len(line) + 1 for line in lines), initial=0))
    hits: dict[str, list[str]] = {}
    for marker, kind in markers.kinds.items():
        needle = marker.lower()
        at = text.find(needle)
        while at >= 0:
            end = at + len(needle)
            if not _alnum(text, at - 1) and not _alnum(text, end):
                number = bisect_right(starts, at)
                hits.setdefault(kind, []).append(f"{where} line {number}: {marker!r}")
                break
            at = text.find(needle, at + 1)
    return [f"{len(found)} {kind} values in {where}: {found[0]}" for kind, found in hits.items()]


def _alnum(text: str, index: int) -> bool:
    return 0 <= index < len(text) and text[index].isalnum() and text[index].isascii()


def scan_run(home: Path, alerts: Iterable[Mapping[str, Any]], markers: Markers) -> list[str]:
    """Problems for markers in the functions' logs under ``home`` or in ``alerts``."""
    lines = function_log_lines(home)
    problems = scan(lines, markers, "function logs")
    if not lines:
        problems.append(f"no function log lines under {home / 'logs'} to scan")
    return problems + scan(alert_texts(alerts), markers, "alerts")
