"""One retry layer: Cloud Storage calls take ``retry.storage()``; ``retry.call`` is for the rest.

The Storage client retries a call it is given a ``Retry`` for; wrapping that call in
``retry.call`` as well multiplies the attempts and the deadlines. The scan below keeps
``retry.call`` to googleapiclient and DICOMweb calls, keeps python-storage's own
``DEFAULT_RETRY`` (a different predicate, 120 s) out, and makes every Storage call name
its retry. tests/integration/test_storage_front.py runs the retry through the client.
"""

from __future__ import annotations

import ast
import io
from pathlib import Path
from typing import TypeGuard

import pytest
import requests
from google.api_core import exceptions as api_exceptions
from google.cloud.storage.exceptions import InvalidResponse
from requests import Response

from dicomflow import retry
from dicomflow.errors import TransientError

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "dicomflow"

# Methods of google-cloud-storage's Client, Bucket and Blob that send a request.
STORAGE_METHODS = frozenset(
    {
        "compose",
        "copy_blob",
        "create_resumable_upload_session",
        "download_as_bytes",
        "download_as_string",
        "download_as_text",
        "download_to_file",
        "download_to_filename",
        "get_blob",
        "get_bucket",
        "list_blobs",
        "lookup_bucket",
        "rewrite",
        "upload_from_file",
        "upload_from_filename",
        "upload_from_string",
    }
)
# Names other libraries use too (Path.exists, a Healthcare request's delete): Storage calls
# when made on a blob.
BLOB_METHODS = frozenset({"delete", "exists", "patch", "reload"})


def _is_blob(node: ast.expr) -> bool:
    """``blob``, ``...blob(...)`` or the like: an expression that holds a Blob."""
    if isinstance(node, ast.Call):
        node = node.func
    text = ast.unparse(node)
    return text == "blob" or text.endswith(".blob")


def _storage_calls(tree: ast.AST) -> list[ast.Call]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            method = node.func.attr
            if method in STORAGE_METHODS or (method in BLOB_METHODS and _is_blob(node.func.value)):
                found.append(node)
    return found


def _is_retry_call(node: ast.AST) -> TypeGuard[ast.Call]:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "call"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "retry"
        and bool(node.args)
    )


def violations(source: str) -> list[str]:
    """What breaks the one-layer rule in ``source``: ``line: reason``."""
    tree = ast.parse(source)
    functions = {
        node.name: node
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }
    found: list[str] = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Name) and node.id == "DEFAULT_RETRY") or (
            isinstance(node, ast.Attribute) and node.attr == "DEFAULT_RETRY"
        ):
            found.append(f"{node.lineno}: DEFAULT_RETRY")
        if isinstance(node, ast.ImportFrom) and node.module == "google.cloud.storage.retry":
            found.append(f"{node.lineno}: imports google.cloud.storage.retry")
        if _is_retry_call(node):
            target = node.args[0]
            body: ast.AST = target
            if isinstance(target, ast.Name) and target.id in functions:
                body = functions[target.id]
            inner = [ast.unparse(c.func) for c in _storage_calls(body)]
            inner += [
                ast.unparse(c.func)
                for c in ast.walk(body)
                if isinstance(c, ast.Call) and ast.unparse(c.func).startswith("objects.")
            ]
            if inner:
                found.append(f"{node.lineno}: retry.call around {', '.join(inner)}")
    for call in _storage_calls(tree):
        if not any(k.arg == "retry" for k in call.keywords):
            found.append(f"{call.lineno}: {ast.unparse(call.func)} without retry=")
    return found


def test_the_scan_finds_each_kind_of_violation() -> None:
    source = """
from google.cloud.storage.retry import DEFAULT_RETRY
from dicomflow import objects, retry

def fetch():
    return bucket.blob("x").download_as_bytes(retry=retry.storage())

a = retry.call(lambda: blob.exists(retry=retry.storage()))
b = retry.call(fetch)
c = retry.call(lambda: objects.read(bucket, "x"))
d = bucket.blob("x").delete()
e = blob.upload_from_string("x", retry=DEFAULT_RETRY)
f = retry.call(lambda: request.execute(num_retries=0))
g = Path("x").exists()
"""
    assert violations(source) == [
        "2: imports google.cloud.storage.retry",
        "8: retry.call around blob.exists",
        "9: retry.call around bucket.blob('x').download_as_bytes",
        "10: retry.call around objects.read",
        "12: DEFAULT_RETRY",
        "11: bucket.blob('x').delete without retry=",
    ]


def test_storage_calls_in_dicomflow_take_one_retry_and_no_retry_call() -> None:
    found = {
        str(path.relative_to(ROOT)): problems
        for path in sorted(PACKAGE.rglob("*.py"))
        if (problems := violations(path.read_text(encoding="utf-8")))
    }
    assert found == {}
    # The scan sees Storage calls at all: objects.py makes them.
    objects_py = (PACKAGE / "objects.py").read_text(encoding="utf-8")
    assert len(_storage_calls(ast.parse(objects_py))) >= 6


# ---- the Storage retry without a server ------------------------------------------------------


def _invalid_response(status: int) -> InvalidResponse:
    response = Response()
    response.status_code = status
    response.raw = io.BytesIO(b"")
    return InvalidResponse(response, "GET https://x/download/b/landing/o/DOE%5EJOHN.dcm")


def test_storage_retry_retries_the_predicates_errors_then_succeeds() -> None:
    answers: list[Exception] = [
        api_exceptions.ServiceUnavailable("x"),
        _invalid_response(503),  # how a media download or upload reports a 503
        api_exceptions.TooManyRequests("x"),
    ]

    def flaky() -> str:
        if answers:
            raise answers.pop(0)
        return "ok"

    media_error = answers[1]
    assert isinstance(media_error, InvalidResponse)
    closed: list[bool] = []
    media_error.response.close = lambda: closed.append(True)
    policy = retry.storage(deadline=10.0)
    assert policy(flaky)() == "ok"
    assert answers == []
    # The failed answer was released before the next attempt (its connection with it).
    assert closed == [True]


@pytest.mark.parametrize(
    "error",
    [
        api_exceptions.PreconditionFailed("x"),
        api_exceptions.NotFound("x"),
        _invalid_response(412),
        _invalid_response(404),
    ],
)
def test_storage_retry_passes_a_412_or_404_through_on_the_first_attempt(
    error: Exception,
) -> None:
    attempts: list[int] = []

    def refused() -> None:
        attempts.append(1)
        raise error

    with pytest.raises(type(error)) as caught:
        retry.storage()(refused)()
    assert caught.value is error and attempts == [1]


def test_storage_retry_gives_up_at_its_deadline_with_transient_error_and_no_name() -> None:
    attempts: list[int] = []

    def down() -> None:
        attempts.append(1)
        raise _invalid_response(503)

    # with_timeout (as the client library may call) keeps the class and its give-up.
    policy = retry.storage(deadline=60.0).with_timeout(0.5)
    assert isinstance(policy, retry.StorageRetry)
    with pytest.raises(TransientError) as caught:
        policy(down)()
    assert str(caught.value) == "gave up after 0s: InvalidResponse (HTTP 503)"
    assert "DOE" not in str(caught.value)
    assert isinstance(caught.value.__cause__, InvalidResponse)
    assert len(attempts) >= 2


def test_one_predicate_serves_dicomweb_errors_too() -> None:
    """A DICOMweb (requests) error carries its response's status, as the API errors do."""

    def http_error(status: int) -> requests.HTTPError:
        response = Response()
        response.status_code = status
        return requests.HTTPError(f"{status} for url: https://x/studies/1.2.3", response=response)

    assert retry.status_of(http_error(503)) == 503
    assert retry.should_retry(http_error(503)) and retry.should_retry(http_error(429))
    assert not retry.should_retry(http_error(404)) and retry.is_permanent(http_error(404))
    assert retry.status_of(requests.HTTPError("no response")) is None
