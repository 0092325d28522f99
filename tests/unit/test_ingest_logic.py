"""Unit tests of ingest's pure logic: filter, event age, header check, staging names and
records, the split of a window, retry rule."""

from __future__ import annotations

import dataclasses
import glob
import os
import random
from datetime import UTC, datetime, timedelta

import pytest
import requests
from google.api_core import exceptions as api_exceptions
from googleapiclient.errors import HttpError
from httplib2 import Response
from pydicom.data import get_testdata_file

from dicomflow import batches, header, ingest, retry, staging
from dicomflow.clock import parse_time
from dicomflow.errors import PermanentError, TransientError
from dicomflow.events import StorageObject, is_too_old, matches_globs, skip_reason
from dicomflow.staging import FileRecord
from tests.ingest_support import PATIENT_NAME, make_instance, make_settings

NOW = datetime(2026, 11, 25, 12, 53, 17, tzinfo=UTC)


def obj(name: str, size: int = 10, bucket: str = "landing") -> StorageObject:
    return StorageObject(bucket=bucket, name=name, generation="1", size=size)


# ---- filter ----------------------------------------------------------------------------------


def test_filter_default_glob_is_case_insensitive_dcm() -> None:
    settings = make_settings("landing", "staging")
    assert skip_reason(settings, obj("a/b/c.dcm")) is None
    assert skip_reason(settings, obj("a/b/C.DCM")) is None
    assert skip_reason(settings, obj("a/b/c.dcm.txt")) == "pattern"
    assert skip_reason(settings, obj("a/b/")) == "folder"
    assert skip_reason(settings, obj("a/b/c.dcm", size=0)) == "empty"


def test_filter_globs_and_prefixes_are_configurable() -> None:
    settings = make_settings(
        "landing",
        "staging",
        DICOMFLOW_INCLUDE_GLOBS="IM*, *.dicom",
        DICOMFLOW_INCLUDE_PREFIXES="incoming/,scanner2/",
    )
    assert skip_reason(settings, obj("incoming/x/IM0001")) is None
    assert skip_reason(settings, obj("scanner2/x.DICOM")) is None
    assert skip_reason(settings, obj("incoming/x.dcm")) == "pattern"
    assert skip_reason(settings, obj("other/IM0001")) == "prefix"
    assert matches_globs("a/b/im01", ("IM*",))
    assert not matches_globs("a/b/xim01", ("IM*",))


@pytest.mark.parametrize(
    "name",
    ["batches/x/k.dcm", "quarantine/w/k.dcm", "manifests/a.dcm", "state/late/x.dcm"],
)
def test_filter_ignores_pipeline_prefixes_in_a_shared_bucket(name: str) -> None:
    settings = make_settings("shared", "shared")
    assert skip_reason(settings, obj(name, bucket="shared")) == "pipeline-object"
    # The same names in another bucket are ordinary uploads.
    assert skip_reason(settings, obj(name, bucket="elsewhere")) is None


def test_filter_ignores_backup_prefix_in_backup_bucket() -> None:
    settings = make_settings("landing", "staging", DICOMFLOW_BACKUP_BUCKET="landing")
    assert skip_reason(settings, obj("backups/2026-11-25/a.dcm")) == "pipeline-object"


def test_event_age() -> None:
    assert parse_time("2026-11-25T12:00:00Z") == datetime(2026, 11, 25, 12, tzinfo=UTC)
    assert parse_time("garbage") is None
    assert parse_time(None) is None
    assert is_too_old(NOW - timedelta(seconds=101), NOW, 100)
    assert not is_too_old(NOW - timedelta(seconds=99), NOW, 100)
    assert not is_too_old(None, NOW, 100)


def test_storage_object_data_decoding() -> None:
    decoded = StorageObject.from_data(
        {"bucket": "b", "name": "n.dcm", "generation": "17", "size": "42", "md5Hash": "x"}
    )
    assert (decoded.generation, decoded.size, decoded.md5_hash) == ("17", 42, "x")
    assert decoded.time_created is None  # the event's time stands in
    created = StorageObject.from_data(
        {"bucket": "b", "name": "n", "generation": "1", "timeCreated": "2026-11-25T12:53:59.9Z"}
    )
    assert created.time_created == datetime(2026, 11, 25, 12, 53, 59, 900000, tzinfo=UTC)
    with pytest.raises(PermanentError, match="malformed"):
        StorageObject.from_data({"bucket": "b", "name": "n"})
    with pytest.raises(PermanentError):
        StorageObject.from_data("nope")


# ---- header check ---------------------------------------------------------------------------


class CountingReader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.calls: list[tuple[int, int]] = []

    def __call__(self, start: int, end: int) -> bytes:
        assert 0 <= start <= end
        self.calls.append((start, end))
        return self.data[start : end + 1]

    @property
    def read_bytes(self) -> int:
        return sum(e - s + 1 for s, e in self.calls)


def test_header_accepts_a_generated_instance_with_one_small_read() -> None:
    data = make_instance(pixel_bytes=5 * 1024 * 1024)
    reader = CountingReader(data)
    uids = header.check(reader, len(data))
    assert uids.transferSyntax == "1.2.840.10008.1.2.1"
    # The first 64 KiB hold everything, the pixel data element's header included.
    assert reader.calls == [(0, header.INITIAL_BYTES - 1)]


def test_header_grows_the_range_only_when_needed() -> None:
    data = make_instance(private_blob=300 * 1024, pixel_bytes=20 * 1024 * 1024)
    reader = CountingReader(data)
    header.check(reader, len(data))
    assert len(reader.calls) == 3  # 64 KiB, 256 KiB, 1 MiB
    assert reader.read_bytes == 1024 * 1024
    assert reader.read_bytes < len(data) / 10


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"omit": ("StudyInstanceUID",)}, "missing-uid"),
        ({"omit": ("SeriesInstanceUID",)}, "missing-uid"),
        ({"sop_class": None}, "missing-uid"),
        ({"overrides": {"StudyInstanceUID": "1.2.abc"}}, "invalid-uid"),
        ({"overrides": {"SeriesInstanceUID": "1.02.3"}}, "invalid-uid"),
    ],
)
def test_header_rejects_bad_identifiers(kwargs: dict[str, object], code: str) -> None:
    data = make_instance(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(header.Rejected) as caught:
        header.check(CountingReader(data), len(data))
    assert caught.value.code == code
    assert PATIENT_NAME not in str(caught.value)


def test_header_rejects_non_dicom_and_tiny_and_truncated() -> None:
    text = b"hello " * 100
    with pytest.raises(header.Rejected, match="not-dicom"):
        header.check(CountingReader(text), len(text))
    with pytest.raises(header.Rejected, match="too small"):
        header.check(CountingReader(b"DICM"), 4)
    full = make_instance()
    cut = full[:140]  # preamble, DICM and a few bytes of meta
    with pytest.raises(header.Rejected):
        header.check(CountingReader(cut), len(cut))


def test_header_reads_on_when_the_first_range_ends_inside_the_pixel_data_header() -> None:
    data = make_instance(pixel_bytes=1_000_000)
    pixel_tag = data.rindex(b"\xe0\x7f\x10\x00")
    reader = CountingReader(data)
    header.check(reader, len(data), initial=pixel_tag + 6)  # half the element header
    first = pixel_tag + 6
    assert reader.calls == [(0, first - 1), (first, 4 * first - 1)]
    cut = data[:-1]
    with pytest.raises(header.Rejected, match="truncated"):
        header.check(CountingReader(cut), len(cut), initial=pixel_tag + 6)


def test_header_rejects_pixel_data_cut_short() -> None:
    data = make_instance(pixel_bytes=100_000)
    whole = CountingReader(data)
    header.check(whole, len(data))
    cut = data[:-10]
    with pytest.raises(header.Rejected, match="truncated"):
        header.check(CountingReader(cut), len(cut))


def _testdata(name: str) -> str:
    path = get_testdata_file(name)
    assert isinstance(path, str), f"pydicom has no test file {name}"
    return path


def test_header_walks_encapsulated_fragments_to_the_delimiter() -> None:
    path = _testdata("JPEG2000.dcm")
    with open(path, "rb") as f:
        data = f.read()
    header.check(CountingReader(data), len(data))
    cut = data[:-100]
    with pytest.raises(header.Rejected, match="truncated"):
        header.check(CountingReader(cut), len(cut))
    no_delimiter = data[:-8]  # every fragment whole, the delimiter missing
    with pytest.raises(header.Rejected, match="truncated"):
        header.check(CountingReader(no_delimiter), len(no_delimiter))


def test_header_never_reads_a_large_non_dicom_file() -> None:
    data = b"\0" * (50 * 1024 * 1024)
    reader = CountingReader(data)
    with pytest.raises(header.Rejected, match="not-dicom"):
        header.check(reader, len(data))
    assert reader.read_bytes == header.INITIAL_BYTES


def test_header_read_cap_for_files_without_identifiers() -> None:
    data = make_instance(private_blob=40 * 1024 * 1024, omit=("StudyInstanceUID",))
    reader = CountingReader(data)
    with pytest.raises(header.Rejected):
        header.check(reader, len(data))
    assert reader.read_bytes <= header.MAX_HEADER_BYTES


def _corpus() -> list[str]:
    root = os.path.dirname(_testdata("CT_small.dcm"))
    return sorted(p for p in glob.glob(os.path.join(root, "*")) if os.path.isfile(p))


def test_header_on_the_pydicom_corpus() -> None:
    accepted, rejected = 0, 0
    for path in _corpus():
        with open(path, "rb") as f:
            data = f.read()
        try:
            uids = header.check(CountingReader(data), len(data), initial=512)
        except header.Rejected as exc:
            rejected += 1
            assert exc.code in {
                "not-dicom",
                "truncated",
                "unreadable",
                "missing-uid",
                "invalid-uid",
                "no-transfer-syntax",
                "no-file-meta",
            }
        else:
            accepted += 1
            assert uids.sop and uids.study and uids.series and uids.sopClass
    assert accepted >= 40
    assert rejected >= 10
    # Known cases, read with the growing range from a 512-byte start.
    ct = _testdata("CT_small.dcm")
    with open(ct, "rb") as f:
        data = f.read()
    assert header.check(CountingReader(data), len(data), initial=512).sop.startswith("1.3.6")
    no_syntax = _testdata("meta_missing_tsyntax.dcm")
    with open(no_syntax, "rb") as f:
        data = f.read()
    with pytest.raises(header.Rejected, match="no-transfer-syntax"):
        header.check(CountingReader(data), len(data))


def _corrupt_vr(data: bytes, tag: bytes = b"\x20\x00\x0d\x00UI") -> bytes:
    """``data`` with the VR of its first explicit-VR element ``tag`` replaced by junk."""
    i = data.index(tag)
    return data[: i + 4] + b"U\xfd" + data[i + 6 :]


def test_header_rejects_a_damaged_vr_as_unreadable() -> None:
    # pydicom parses lazily: the bad VR of StudyInstanceUID only raises (NotImplementedError)
    # when the value is read, after the parse itself succeeded.
    data = _corrupt_vr(make_instance(study="1.2.3.4"))
    with pytest.raises(header.Rejected) as caught:
        header.check(CountingReader(data), len(data))
    assert caught.value.code == "unreadable"
    assert str(caught.value) == "unreadable: header values could not be read (NotImplementedError)"
    assert "1.2.3.4" not in str(caught.value) and "0x55" not in str(caught.value)


def test_header_passes_errors_of_the_read_itself_through_unchanged() -> None:
    data = make_instance(private_blob=100 * 1024)
    failure = api_exceptions.ServiceUnavailable("busy")

    def flaky(start: int, end: int) -> bytes:
        if start > 0:  # the second, growing read fails (transient)
            raise failure
        return data[start : end + 1]

    with pytest.raises(api_exceptions.ServiceUnavailable) as caught:
        header.check(flaky, len(data))
    assert caught.value is failure


def _fuzz_variants(data: bytes, rng: random.Random) -> list[bytes]:
    """Damaged copies of ``data``: bytes flipped in the header, VRs broken, cut short."""
    variants = []
    head = min(len(data), 4096)
    for _ in range(12):
        b = bytearray(data)
        for _ in range(rng.randrange(1, 6)):
            i = rng.randrange(head)
            b[i] ^= 1 << rng.randrange(8) if rng.random() < 0.5 else rng.randrange(1, 256)
        variants.append(bytes(b))
    for tag in (b"\x20\x00\x0d\x00UI", b"\x08\x00\x18\x00UI", b"\x08\x00\x16\x00UI"):
        if tag in data:
            variants.append(_corrupt_vr(data, tag))
    variants.append(data[: rng.randrange(133, max(134, head))])
    return variants


def test_header_check_fuzz_raises_only_rejected() -> None:
    """Damaged headers of the pydicom corpus: ``check`` rejects, it never raises otherwise."""
    rng = random.Random(20261125)
    checked = unreadable = 0
    for path in _corpus():
        with open(path, "rb") as f:
            data = f.read()
        if data[128:132] != b"DICM":
            continue
        for variant in _fuzz_variants(data, rng):
            checked += 1
            try:
                header.check(CountingReader(variant), len(variant), initial=1024)
            except header.Rejected as exc:
                unreadable += exc.code == "unreadable"
    assert checked >= 500
    assert unreadable > 0


# ---- staging names, records and the split of a window ----------------------------------------


def test_file_keys_are_stable_and_lead_with_their_bits() -> None:
    key = staging.file_key("b", "a/x.dcm", 5)
    assert staging.is_key(key) and len(key) == staging.BITS + 40
    assert key == staging.file_key("b", "a/x.dcm", "5")
    assert key != staging.file_key("b", "a/x.dcm", 6)
    assert key != staging.file_key("c", "a/x.dcm", 5)
    keys = [staging.file_key("b", f"{i}.dcm", 1) for i in range(2000)]
    assert 800 < sum(k[0] == "0" for k in keys) < 1200  # the first bit halves a window
    assert not staging.is_key("../x")


def test_windows_batches_and_import_uris() -> None:
    assert staging.window_id(NOW, 60) == "20261125T125300Z"
    assert staging.window_id(NOW, 300) == "20261125T125000Z"
    assert staging.parse_window("20261125T125300Z") == datetime(2026, 11, 25, 12, 53, tzinfo=UTC)
    assert staging.batch_id("20261125T125300Z") == "20261125T125300Z"
    assert staging.batch_id("20261125T125300Z", "01") == "20261125T125300Z-01"
    assert staging.parse_batch("20261125T125300Z-01") == ("20261125T125300Z", "01")
    assert staging.parse_batch("20261125T125300Z") == ("20261125T125300Z", "")
    for bad in ("../x", "20261125T125300Z-2", "20261125T125300Z-0000000"):
        with pytest.raises(ValueError, match="invalid batch id"):
            staging.parse_batch(bad)
    with pytest.raises(ValueError, match="invalid window"):
        staging.parse_window("2026-11-25")
    assert (
        staging.import_uri("stage", "20261125T125300Z-01")
        == "gs://stage/batches/20261125T125300Z/01*.dcm"
    )
    assert staging.import_uri("stage", "20261125T125300Z") == (
        "gs://stage/batches/20261125T125300Z/*.dcm"
    )
    settings = make_settings(
        "landing",
        "staging",
        DICOMFLOW_SEAL_GRACE_SECONDS="10",
        DICOMFLOW_LATE_WINDOW_SECONDS="600",
    )
    sealed = datetime(2026, 11, 25, 12, 54, 10, tzinfo=UTC)
    assert staging.seal_time("20261125T125300Z", settings) == sealed
    # A late window is longer: its start plus late_window_seconds, plus the grace.
    late = staging.late_window_id(datetime(2026, 11, 25, 12, 57, 1, tzinfo=UTC), 600)
    assert late == "20261125T125000L"
    assert staging.parse_window(late) == datetime(2026, 11, 25, 12, 50, tzinfo=UTC)
    assert staging.seal_time(late, settings) == datetime(2026, 11, 25, 13, 0, 10, tzinfo=UTC)
    assert staging.parse_batch(f"{late}-01") == (late, "01")


def test_a_copy_has_half_the_grace_to_land() -> None:
    settings = make_settings("landing", "staging", DICOMFLOW_SEAL_GRACE_SECONDS="20")
    assert ingest.copy_deadline(settings) == 10
    no_grace = make_settings("landing", "staging", DICOMFLOW_SEAL_GRACE_SECONDS="0")
    assert ingest.copy_deadline(no_grace) == 0.5


def _record(key: str, size: int = 1) -> FileRecord:
    return FileRecord(
        key=key, bucket="b", name="n", generation="1", size=size, home="W", window="W"
    )


def test_the_record_round_trips_as_metadata_and_as_a_line() -> None:
    record = FileRecord(
        key=staging.file_key("b", "a/x.dcm", 5),
        bucket="b",
        name="a/x.dcm",
        generation="5",
        size=3,
        home="20261125T125300Z",
        window="20261125T125400Z",
        event="e1",
        md5="bWQ1",
        crc32c="Y3Jj",
        study="1.2",
        series="1.3",
        sop="1.4",
        via="late",
    )
    meta = record.metadata()
    assert all(k.startswith(staging.META_PREFIX) and isinstance(v, str) for k, v in meta.items())
    assert "df-window" not in meta and "df-reason" not in meta  # the folder names the window
    assert FileRecord.from_line(record.line()) == record
    assert FileRecord.from_line({**{k[3:]: v for k, v in meta.items()}, "window": record.window})
    assert record.checksum == "md5:bWQ1"
    assert dataclasses.replace(record, md5=None).checksum == "crc32c:Y3Jj"
    assert record.uri == "gs://b/a/x.dcm"


def test_split_keeps_a_window_whole_when_it_fits() -> None:
    records = [_record(f"{i:06b}" + "0" * 40) for i in range(10)]
    assert batches.split(records, 10, 10**9) == [("", records)]
    assert batches.split([], 10, 10**9) == []


def test_split_halves_by_the_first_bit_then_goes_deeper() -> None:
    records = [_record(f"{q:02b}{j:04b}" + "a" * 40) for q in range(4) for j in range(3)]
    parts = batches.split(records, 8, 10**9)
    assert [(bits, len(part)) for bits, part in parts] == [("0", 6), ("1", 6)]
    deeper = batches.split(records, 3, 10**9)
    assert [(bits, len(part)) for bits, part in deeper] == [
        ("00", 3),
        ("01", 3),
        ("10", 3),
        ("11", 3),
    ]
    for bits, part in deeper:
        assert all(r.key.startswith(bits) for r in part)


def test_split_respects_the_byte_cap_too() -> None:
    records = [_record("0" + f"{i:05b}" + "a" * 40, size=100) for i in range(2)]
    records += [_record("1" + f"{i:05b}" + "a" * 40, size=100) for i in range(2)]
    assert [bits for bits, _ in batches.split(records, 100, 250)] == ["0", "1"]
    # Keys that share every bit cannot be split further: the deepest parts are used.
    same = [_record("000000" + f"{i:040x}") for i in range(5)]
    assert [bits for bits, _ in batches.split(same, 2, 10**9)] == ["000000"]


# ---- retry rule ------------------------------------------------------------------------------


def _http_error(status: int) -> HttpError:
    return HttpError(Response({"status": status}), b'{"error": {"message": "x"}}')


def test_should_retry() -> None:
    for transient in (
        api_exceptions.TooManyRequests("x"),
        api_exceptions.ServiceUnavailable("x"),
        api_exceptions.InternalServerError("x"),
        _http_error(429),
        _http_error(503),
        requests.ConnectionError(),
        TimeoutError(),
    ):
        assert retry.should_retry(transient), transient
    for permanent in (
        api_exceptions.NotFound("x"),
        api_exceptions.PreconditionFailed("x"),
        api_exceptions.Forbidden("x"),
        _http_error(400),
        _http_error(404),
        ValueError(),
    ):
        assert not retry.should_retry(permanent), permanent


def test_call_retries_then_gives_up() -> None:
    attempts: list[int] = []
    sleeps: list[float] = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise api_exceptions.ServiceUnavailable("busy")
        return "ok"

    assert retry.call(flaky, sleep=sleeps.append) == "ok"
    assert len(attempts) == 3 and len(sleeps) == 2

    def always() -> str:
        raise api_exceptions.TooManyRequests("quota")

    with pytest.raises(TransientError, match="gave up"):
        retry.call(always, deadline=0.5, initial=0.1, sleep=lambda s: None)

    def quoting() -> str:  # storage errors quote the request URL, object name included
        raise api_exceptions.ServiceUnavailable("GET https://x/b/landing/o/DOE%5EJOHN.dcm")

    with pytest.raises(TransientError) as caught:
        retry.call(quoting, deadline=0.3, initial=0.1, sleep=lambda s: None)
    assert str(caught.value) == "gave up after 0s: ServiceUnavailable (HTTP 503)"
    assert isinstance(caught.value.__cause__, api_exceptions.ServiceUnavailable)

    def permanent() -> str:
        raise api_exceptions.NotFound("gone")

    with pytest.raises(api_exceptions.NotFound):
        retry.call(permanent, sleep=sleeps.append)
