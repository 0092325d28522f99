"""Property tests (hypothesis) on bad input: every input gets a classified outcome.

- The header check returns ``Uids`` or raises ``header.Rejected`` with a documented
  code, on any bytes, on bytes after a valid preamble, and on damaged real headers.
- The import wildcards (``parse_gcs_source``) raise ``ValueError`` for an invalid
  URI or give a pattern that answers with a bool, and agree with a reference model
  written from the module docstring; ``matches_globs`` answers with a bool.
- The event decoder gives a ``StorageObject`` or a ``PermanentError`` whose message
  holds no value of the payload, and ingest routes any finalize event to a result
  (skipped, ignored or permanent_error), never to an exception.

Examples are derandomized and bounded, with no deadline: CI sees the same inputs on
every run, and a shared, noisy machine does not fail them on time.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from dataclasses import astuple
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from cloudevents.http import CloudEvent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file

from dicomflow import alerts, clock, functions, header, log, runtime, staging
from dicomflow.clock import parse_time
from dicomflow.errors import PermanentError, TransientError
from dicomflow.events import (
    FINALIZED,
    StorageObject,
    is_too_old,
    matches_globs,
    skip_reason,
)
from localcloud.healthcare.wildcards import parse_gcs_source
from tests.ingest_support import PATIENT_NAME, make_instance, make_settings

# The header check's rejection codes (dicomflow.header).
CODES = {
    "not-dicom",
    "truncated",
    "unreadable",
    "no-file-meta",
    "no-transfer-syntax",
    "missing-uid",
    "invalid-uid",
}
SKIP_REASONS = {"pipeline-object", "folder", "prefix", "pattern", "empty"}
NOW = datetime(2026, 11, 25, 12, 53, 17, tzinfo=UTC)


def profile(examples: int, *suppress: HealthCheck) -> Callable[[Any], Any]:
    """Bounded, derandomized, no deadline, no example database (nothing written to the repo)."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, *suppress],
    )


# ---- header check ---------------------------------------------------------------------------


def outcome(data: bytes, initial: int = header.INITIAL_BYTES) -> str:
    """The classified outcome of the header check: ``accepted`` or a rejection code."""
    reads: list[tuple[int, int]] = []

    def read(start: int, end: int) -> bytes:
        assert 0 <= start <= end
        reads.append((start, end))
        return data[start : end + 1]

    try:
        uids = header.check(read, len(data), initial)
    except header.Rejected as rejected:
        assert rejected.code in CODES, rejected.code
        assert rejected.detail
        assert PATIENT_NAME not in str(rejected)  # reasons never quote tag values
        return rejected.code
    finally:
        assert all(end < len(data) for _, end in reads)  # never past the end of the object
    for value in astuple(uids):
        assert isinstance(value, str) and value and value == value.strip()
    return "accepted"


@cache
def real_headers() -> tuple[bytes, ...]:
    """Small real files: generated (with a patient name to look for), and pydicom's own."""
    files = [make_instance(study="1.2.3.4", series="1.2.3.4.5", sop="1.2.3.4.5.6")]
    for name in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "JPEG2000.dcm", "image_dfl.dcm"):
        files.append(Path(str(get_testdata_file(name))).read_bytes())
    return tuple(files)


def uids_of(data: bytes) -> header.Uids:
    return header.check(lambda start, end: data[start : end + 1], len(data))


def test_the_real_headers_pass_whole() -> None:
    assert [outcome(data) for data in real_headers()] == ["accepted"] * len(real_headers())


@profile(300)
@given(st.binary(max_size=2048), st.sampled_from([header.INITIAL_BYTES, 256, 140]))
def test_header_check_on_any_bytes(data: bytes, initial: int) -> None:
    result = outcome(data, initial)
    if len(data) < 132 or data[128:132] != b"DICM":
        assert result == "not-dicom"


@profile(300)
@given(st.binary(min_size=128, max_size=128), st.binary(max_size=2048))
def test_header_check_on_garbage_after_a_valid_preamble(preamble: bytes, rest: bytes) -> None:
    data = preamble + b"DICM" + rest
    assert outcome(data) == outcome(data, initial=200)


@st.composite
def damaged_real_header(draw: st.DrawFn) -> bytes:
    """A real file with bytes overwritten, inserted, deleted, and maybe cut short."""
    data = bytearray(draw(st.sampled_from(real_headers())))
    edits = draw(
        st.lists(
            st.tuples(st.integers(0, 3), st.integers(0, 4095), st.binary(min_size=1, max_size=8))
        )
    )
    for kind, where, chunk in edits[:8]:
        where %= len(data)
        if kind == 0:
            data[where : where + len(chunk)] = chunk
        elif kind == 1:
            data[where:where] = chunk
        elif kind == 2:
            del data[where : where + len(chunk)]
        else:
            del data[where + 132 :]
    return bytes(data)


@profile(400)
@given(damaged_real_header(), st.sampled_from([header.INITIAL_BYTES, 512, 200]))
def test_header_check_on_damaged_real_headers(data: bytes, initial: int) -> None:
    outcome(data, initial)


@profile(200)
@given(st.sampled_from(real_headers()), st.data())
def test_a_real_header_cut_short_is_never_accepted_with_other_uids(
    whole: bytes, data: st.DataObject
) -> None:
    """A cut file is accepted only with the UIDs of the whole file, never shortened ones."""
    # Mostly in the first 3 KiB, where the UIDs are.
    cut = data.draw(st.one_of(st.integers(0, 3 * 1024), st.integers(0, len(whole) - 1)))
    part = whole[: min(cut, len(whole) - 1)]
    if outcome(part) == "accepted":
        assert uids_of(part) == uids_of(whole)


# ---- wildcard matchers ----------------------------------------------------------------------

PIECES = ["*", "**", "?", "[", "]", "\\", "/", "../", "\n", ".", ".dcm", "a", "b", " ", "ü", "患"]
pattern_text = st.lists(st.sampled_from(PIECES), max_size=8).map("".join)
name_text = st.one_of(pattern_text, st.text(max_size=24))


def reference_valid(uri: str) -> bool:
    """The wildcard rules of the module docstring of ``localcloud.healthcare.wildcards``."""
    if not uri.startswith("gs://"):
        return False
    bucket, slash, pattern = uri[len("gs://") :].partition("/")
    if not bucket or "*" in bucket or "?" in bucket or not slash or not pattern:
        return False
    double = pattern.find("**")
    if double < 0:
        return True
    before, after = pattern[:double], pattern[double + 2 :]
    if "*" in before or "?" in before:
        return False
    extension = after[1:]
    return not after or (
        after.startswith(".") and bool(extension) and not any(c in extension for c in "*?/")
    )


def reference_match(pattern: str, name: str) -> bool:
    """``*``: any run without ``/``; ``?``: any one character; ``**[.ext]``: any tail."""
    double = pattern.find("**")
    if double >= 0:
        before, extension = pattern[:double], pattern[double + 2 :]
        return (
            len(name) >= len(before) + len(extension)
            and name.startswith(before)
            and name.endswith(extension)
        )

    @cache
    def at(i: int, j: int) -> bool:
        if i == len(pattern):
            return j == len(name)
        char = pattern[i]
        if char == "*":
            return at(i + 1, j) or (j < len(name) and name[j] != "/" and at(i, j + 1))
        if j == len(name):
            return False
        return (char == "?" or name[j] == char) and at(i + 1, j + 1)

    return at(0, 0)


@st.composite
def uri_and_name(draw: st.DrawFn) -> tuple[str, str]:
    """A URI, and a name made from its pattern (so that it often matches) or any name."""
    bucket = draw(st.sampled_from(["b", "", "b*", "b?", "bkt.example"]))
    pieces = draw(st.lists(st.sampled_from(PIECES), max_size=8))
    uri = draw(st.sampled_from(["gs://", "gs:/", "s3://"])) + bucket + "/" + "".join(pieces)
    if draw(st.booleans()):
        return uri, draw(name_text)
    filler = st.text(alphabet="ab/ü.\n", max_size=4)
    name = ""
    for piece in pieces:
        if piece in ("*", "**"):
            name += draw(filler)
        elif piece == "?":
            name += draw(st.characters(codec="utf-8"))
        else:
            name += piece
    return uri, name


@profile(500)
@given(uri_and_name())
def test_import_wildcards_agree_with_the_reference(case: tuple[str, str]) -> None:
    uri, name = case
    try:
        pattern = parse_gcs_source(uri)
    except ValueError as invalid:
        assert repr(uri) in str(invalid)
        assert not reference_valid(uri)
        return
    assert reference_valid(uri)
    bucket, _, object_pattern = uri[len("gs://") :].partition("/")
    assert (pattern.bucket, pattern.pattern) == (bucket, object_pattern)
    selected = pattern.matches(name)
    assert selected is reference_match(object_pattern, name)
    # Listing uses the prefix (fake-gcs-server ignores match_glob): nothing outside it matches.
    assert not selected or name.startswith(pattern.prefix)


@profile(300)
@given(st.text(max_size=40), name_text)
def test_import_wildcards_on_any_text(uri: str, name: str) -> None:
    for candidate in (uri, "gs://b/" + uri):
        try:
            pattern = parse_gcs_source(candidate)
        except ValueError:
            assert not reference_valid(candidate)
        else:
            assert isinstance(pattern.matches(name), bool)


@profile(300)
@given(name_text, st.lists(pattern_text, max_size=3))
def test_filter_globs_on_any_names_and_patterns(name: str, globs: list[str]) -> None:
    assert isinstance(matches_globs(name, tuple(globs)), bool)
    # fnmatch's '*' crosses '/': the default glob is a case-insensitive suffix test.
    assert matches_globs(name, ("*.dcm",)) is name.lower().endswith(".dcm")
    assert matches_globs(name, ("*",))


# ---- event decoder --------------------------------------------------------------------------

SECRET = "DOE^JOHN"  # in every generated name: it must never reach a message or a log line
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),  # Python's json reads NaN and Infinity too
    st.text(max_size=12),
    st.sampled_from(["", "0", "-1", "17", "1.5", "1e3", " 42", "0x10", "١٢", "9" * 21, "9" * 5000]),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)
counts = st.one_of(st.integers(0, 2**64), st.integers(0, 2**64).map(str))
nasty_names = st.one_of(
    pattern_text.map(lambda text: f"in/{SECRET}{text}"),
    st.text(max_size=16).map(lambda text: f"{text}{SECRET}.dcm"),
    st.sampled_from(["\ud800", "a\udfff.dcm", "\x00"]).map(lambda text: SECRET + text),
)
payloads = st.fixed_dictionaries(
    {},
    optional={
        "bucket": st.one_of(st.sampled_from(["landing", "staging", ""]), json_values),
        "name": st.one_of(nasty_names, json_values),
        "generation": st.one_of(counts, json_values),
        "size": st.one_of(counts, json_values),
        "md5Hash": json_values,
        "crc32c": json_values,
        "contentType": json_values,
        "metageneration": json_values,
    },
)


@profile(500)
@given(st.one_of(payloads, json_values))
def test_event_decoder_on_any_payload(data: Any) -> None:
    settings = make_settings("landing", "staging")
    try:
        obj = StorageObject.from_data(data)
    except PermanentError as malformed:
        assert SECRET not in str(malformed)
        return
    assert obj.bucket and obj.name and isinstance(obj.bucket, str) and isinstance(obj.name, str)
    assert obj.generation.isdigit() and int(obj.generation) > 0
    assert isinstance(obj.size, int) and obj.size >= 0
    for optional in (obj.md5_hash, obj.crc32c, obj.content_type):
        assert optional is None or isinstance(optional, str)
    assert skip_reason(settings, obj) in SKIP_REASONS | {None}
    label = alerts.object_label(settings, obj.bucket, obj.name)
    assert label.startswith("h:") and SECRET not in label
    key = staging.file_key(obj.bucket, obj.name, obj.generation)
    assert staging.is_key(key)
    record = staging.FileRecord(
        key=key,
        bucket=obj.bucket,
        name=obj.name,
        generation=obj.generation,
        size=obj.size,
        home="20261125T125300Z",
        window="20261125T125300Z",
        md5=obj.md5_hash,
        crc32c=obj.crc32c,
    )
    # As ingest sends it: custom metadata, string values.
    assert all(isinstance(v, str) and v for v in record.metadata().values())


@profile(300)
@given(st.one_of(json_values, st.datetimes(timezones=st.timezones()), st.text(max_size=40)))
def test_event_time_on_any_value(value: Any) -> None:
    moment = parse_time(value)
    assert moment is None or moment.tzinfo is not None
    assert isinstance(is_too_old(moment, NOW, 3600), bool)
    if moment is not None:
        clock.iso(moment)


class NoStorage:
    """Stands for the storage client where a test must not reach it."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"storage used: {name}")


@pytest.fixture
def ingest_without_storage() -> Any:
    """ingest's context with a filter that skips every decodable generated object."""
    settings = make_settings("landing", "staging", DICOMFLOW_INCLUDE_PREFIXES="never-used/")
    storage: Any = NoStorage()
    runtime.set_context(runtime.Context(settings=settings, storage=storage))
    stream = io.StringIO()
    log.configure(logging.INFO, stream)
    yield stream
    runtime.set_context(None)


def _foreign(data: Any) -> bool:
    """True when ``data`` decodes to an object that is neither the landing bucket's nor one
    of the pipeline's own (the settings of ``ingest_without_storage``)."""
    try:
        obj = StorageObject.from_data(data)
    except PermanentError:
        return False
    settings = runtime.context().settings
    return obj.bucket != settings.landing_bucket and not settings.is_pipeline_object(
        obj.bucket, obj.name
    )


# The fixture's context and log stream serve every example; each example empties the stream.
@profile(300, HealthCheck.function_scoped_fixture)
@given(
    st.one_of(payloads, json_values, st.binary(max_size=16)),
    st.sampled_from([FINALIZED, "google.cloud.storage.object.v1.deleted", "x\n\u2028"]),
)
def test_ingest_classifies_any_finalize_event(
    ingest_without_storage: io.StringIO, data: Any, kind: str
) -> None:
    stream = ingest_without_storage
    stream.seek(0)
    stream.truncate()
    event = CloudEvent({"type": kind, "source": "//storage.googleapis.com/x", "id": "e1"}, data)
    if kind == FINALIZED and _foreign(data):
        # An object of another bucket is recorded as a foreign-bucket drop without being
        # read: that write reaches Storage, which the stand-in refuses (a retried error).
        with pytest.raises(TransientError, match="AssertionError"):
            runtime.handle("ingest", functions.ingest, event)
        result = {"status": "foreign"}
    else:
        result = runtime.handle("ingest", functions.ingest, event)
    if kind != FINALIZED:
        assert result == {"status": "ignored", "reason": "event-type"}
    elif result["status"] in ("permanent_error", "foreign"):
        assert SECRET not in result.get("error", "")
    else:
        assert result["status"] == "skipped" and result["reason"] in SKIP_REASONS
    # One JSON object a line; "\n" only (str.splitlines would also split at U+2028 inside one).
    lines = stream.getvalue().rstrip("\n").split("\n")
    assert lines
    for line in lines:
        assert SECRET not in line and SECRET not in json.loads(line)["message"]
