"""How the benchmark proxy names Cloud Storage requests, and how the storage front judges them."""

from __future__ import annotations

import json

import pytest

from localcloud.faultproxy import storage_area, storage_operation
from localcloud.proxy import Request
from localcloud.storagefront import (
    ABSENT,
    Live,
    failed_condition,
    is_last_chunk,
    precondition_failed,
)

MULTIPART = (
    b"--b\r\ncontent-type: application/json; charset=UTF-8\r\n\r\n"
    b'{"name": "ledger/ab\\"c.json", "contentType": "application/json"}\r\n--b\r\n'
    b"content-type: application/json\r\n\r\n{}\r\n--b--"
)


@pytest.mark.parametrize(
    ("method", "path", "query", "body", "operation", "area"),
    [
        ("POST", "/upload/storage/v1/b/stg/o", "uploadType=multipart", MULTIPART,
         "objects.insert", "stg:ledger"),
        ("GET", "/storage/v1/b/stg/o", "prefix=state/claims/2026&delimiter=/", b"",
         "objects.list", "stg:state/claims"),
        ("GET", "/download/storage/v1/b/stg/o/state%2Freport%2Fx.json", "alt=media", b"",
         "objects.download", "stg:state/report"),
        ("DELETE", "/storage/v1/b/stg/o/batches%2F1%2Fk.dcm", "", b"",
         "objects.delete", "stg:batches"),
        ("POST", "/storage/v1/b/land/o/a%2Fb.dcm/rewriteTo/b/stg/o/batches%2Fx", "", b"",
         "objects.rewrite", "land:a"),
        ("GET", "/storage/v1/b/stg", "", b"", "buckets.get", "stg:"),
        ("GET", "/elsewhere", "", b"", "other", "other"),
    ],
)  # fmt: skip
def test_requests_are_named_by_operation_and_object_kind(
    method: str, path: str, query: str, body: bytes, operation: str, area: str
) -> None:
    assert storage_operation(method, path, query) == operation
    assert storage_area(method, path, query, body) == area


@pytest.mark.parametrize(
    ("conditions", "live", "failed"),
    [
        ({"ifGenerationMatch": 0}, ABSENT, None),
        ({"ifGenerationMatch": 0}, Live(7, 1), "ifGenerationMatch"),
        ({"ifGenerationMatch": 7}, Live(7, 1), None),
        ({"ifGenerationMatch": 7}, ABSENT, "ifGenerationMatch"),
        ({"ifGenerationNotMatch": 0}, ABSENT, "ifGenerationNotMatch"),
        ({"ifGenerationNotMatch": 0}, Live(7, 1), None),
        ({"ifMetagenerationMatch": 1}, Live(7, 2), "ifMetagenerationMatch"),
        ({"ifMetagenerationNotMatch": 1}, Live(7, 2), None),
        ({"ifGenerationMatch": 7, "ifMetagenerationMatch": 1}, Live(7, 2), "ifMetagenerationMatch"),
        ({}, Live(7, 2), None),
    ],
)  # fmt: skip
def test_preconditions_hold_as_cloud_storage_defines_them(
    conditions: dict[str, int], live: Live, failed: str | None
) -> None:
    assert failed_condition(conditions, live) == failed


def test_the_412_is_the_shape_the_client_library_raises_precondition_failed_for() -> None:
    reply = precondition_failed()
    error = json.loads(reply.body)["error"]
    assert (reply.status, error["code"], error["errors"][0]["reason"]) == (
        412,
        412,
        "conditionNotMet",
    )


@pytest.mark.parametrize(
    ("content_range", "last"),
    [
        (None, True),
        ("bytes 0-99/100", True),
        ("bytes */100", True),
        ("bytes 0-262143/*", False),
        ("bytes 0-49/100", False),
    ],
)
def test_the_last_chunk_of_a_resumable_upload_is_the_one_that_completes_it(
    content_range: str | None, last: bool
) -> None:
    headers = [("Content-Range", content_range)] if content_range else []
    assert (
        is_last_chunk(Request("PUT", "/upload/storage/v1/b/b/o?upload_id=x", headers, b"")) is last
    )


def test_compose_is_named() -> None:
    assert storage_operation("POST", "/storage/v1/b/stg/o/whole/compose", "") == "objects.compose"
