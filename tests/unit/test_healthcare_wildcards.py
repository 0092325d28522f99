"""The gcsSource.uri wildcard rules of the Healthcare emulator's import."""

from __future__ import annotations

import pytest

from localcloud.healthcare.wildcards import parse_gcs_source

MATCHES = [
    # (pattern, object name, selected?)
    ("gs://b/dir/*.dcm", "dir/a.dcm", True),
    ("gs://b/dir/*.dcm", "dir/.dcm", True),
    ("gs://b/dir/*.dcm", "dir/sub/a.dcm", False),
    ("gs://b/dir/*.dcm", "dir/a.dcmx", False),
    ("gs://b/dir/*", "dir/a", True),
    ("gs://b/dir/*", "dir/", True),
    ("gs://b/dir/*", "dir/x/y", False),
    ("gs://b/dir/?.dcm", "dir/a.dcm", True),
    ("gs://b/dir/?.dcm", "dir/ab.dcm", False),
    ("gs://b/dir/?.dcm", "dir/.dcm", False),
    ("gs://b/dir/**", "dir/a/b/c.dcm", True),
    ("gs://b/dir/**", "dir/", True),
    ("gs://b/dir/**", "other/a.dcm", False),
    ("gs://b/dir/**.dcm", "dir/a/b/c.dcm", True),
    ("gs://b/dir/**.dcm", "dir/c.dcm", True),
    ("gs://b/dir/**.dcm", "dir/c.txt", False),
    ("gs://b/dir/**.dcm", "dir/c.dcm.bak", False),
    ("gs://b/**", "anything/at all/ü.dcm", True),
    ("gs://b/a/file.dcm", "a/file.dcm", True),
    ("gs://b/a/file.dcm", "a/file.dcm2", False),
    ("gs://b/a/file.dcm", "a/fileXdcm", False),
    # object names holding wildcard characters, spaces and unicode
    ("gs://b/dir/*.dcm", "dir/a*b.dcm", True),
    ("gs://b/dir/*.dcm", "dir/what?.dcm", True),
    ("gs://b/dir/*.dcm", "dir/with space.dcm", True),
    ("gs://b/dir/*.dcm", "dir/Müller_Ωmega.dcm", True),
    ("gs://b/dir/?.dcm", "dir/*.dcm", True),
    ("gs://b/dir/?.dcm", "dir/ü.dcm", True),
    ("gs://b/dir/?.dcm", "dir/ .dcm", True),
    ("gs://b/dir with space/*.dcm", "dir with space/x.dcm", True),
    ("gs://b/dir with space/*.dcm", "dir_with_space/x.dcm", False),
    ("gs://b/ünï/**", "ünï/ß/x", True),
    ("gs://b/a.b/*.dcm", "aXb/x.dcm", False),
    ("gs://b/a+b(c)[d]/*.dcm", "a+b(c)[d]/x.dcm", True),
]


@pytest.mark.parametrize(("uri", "name", "selected"), MATCHES)
def test_matching(uri: str, name: str, selected: bool) -> None:
    assert parse_gcs_source(uri).matches(name) is selected


@pytest.mark.parametrize(
    ("uri", "bucket", "prefix"),
    [
        ("gs://bkt/dir/*.dcm", "bkt", "dir/"),
        ("gs://bkt/dir/a?c/*.dcm", "bkt", "dir/a"),
        ("gs://bkt/dir/**.dcm", "bkt", "dir/"),
        ("gs://bkt/**", "bkt", ""),
        ("gs://bkt/exact.dcm", "bkt", "exact.dcm"),
    ],
)
def test_bucket_and_listing_prefix(uri: str, bucket: str, prefix: str) -> None:
    pattern = parse_gcs_source(uri)
    assert (pattern.bucket, pattern.prefix) == (bucket, prefix)


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("b/dir/*.dcm", "gs://"),
        ("s3://b/x", "gs://"),
        ("gs://", "bucket"),
        ("gs:///x", "bucket"),
        ("gs://b*/x", "bucket"),
        ("gs://b?/x", "bucket"),
        ("gs://b", "object path"),
        ("gs://b/", "object path"),
        ("gs://b/dir/**/x.dcm", "end of the path"),
        ("gs://b/**/", "end of the path"),
        ("gs://b/a**b", "end of the path"),
        ("gs://b/dir/***", "end of the path"),
        ("gs://b/dir/**.d*m", "end of the path"),
        ("gs://b/dir/**.d?m", "end of the path"),
        ("gs://b/dir/**.", "end of the path"),
        ("gs://b/dir/**dcm", "end of the path"),
        ("gs://b/*/dir/**.dcm", "combined"),
        ("gs://b/d?r/**", "combined"),
    ],
)
def test_invalid_patterns(uri: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as caught:
        parse_gcs_source(uri)
    assert repr(uri) in str(caught.value)
