"""How the benchmark proxy names Cloud Storage requests (operation, and where they go)."""

from __future__ import annotations

import pytest

from localcloud.faultproxy import storage_area, storage_operation

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
