"""The gcsSource.uri wildcard rules of the Healthcare emulator's import."""

from __future__ import annotations

import pytest

from localcloud.healthcare.wildcards import parse_gcs_source

# pattern -> (object names it selects, object names it leaves out); wildcard characters,
# spaces and unicode in a name match as themselves.
MATCHES: dict[str, tuple[list[str], list[str]]] = {
    "gs://b/dir/*.dcm": (
        [
            "dir/a.dcm",
            "dir/.dcm",
            "dir/a*b.dcm",
            "dir/what?.dcm",
            "dir/with space.dcm",
            "dir/Müller_Ωmega.dcm",
        ],
        ["dir/sub/a.dcm", "dir/a.dcmx"],
    ),
    "gs://b/dir/*": (["dir/a", "dir/"], ["dir/x/y"]),
    "gs://b/dir/?.dcm": (
        ["dir/a.dcm", "dir/*.dcm", "dir/ü.dcm", "dir/ .dcm"],
        ["dir/ab.dcm", "dir/.dcm"],
    ),
    "gs://b/dir/**": (["dir/a/b/c.dcm", "dir/"], ["other/a.dcm"]),
    "gs://b/dir/**.dcm": (["dir/a/b/c.dcm", "dir/c.dcm"], ["dir/c.txt", "dir/c.dcm.bak"]),
    "gs://b/**": (["anything/at all/ü.dcm"], []),
    "gs://b/a/file.dcm": (["a/file.dcm"], ["a/file.dcm2", "a/fileXdcm"]),
    "gs://b/dir with space/*.dcm": (["dir with space/x.dcm"], ["dir_with_space/x.dcm"]),
    "gs://b/ünï/**": (["ünï/ß/x"], []),
    "gs://b/a.b/*.dcm": ([], ["aXb/x.dcm"]),
    "gs://b/a+b(c)[d]/*.dcm": (["a+b(c)[d]/x.dcm"], []),
}
CASES = [
    (uri, name, selected)
    for uri, names in MATCHES.items()
    for selected, listed in zip((True, False), names, strict=True)
    for name in listed
]


@pytest.mark.parametrize(("uri", "name", "selected"), CASES)
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
