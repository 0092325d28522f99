"""Small JSON objects in Cloud Storage: the only coordination the pipeline uses.

Every marker, seal, intent, slot, lease and manifest goes through these helpers:

- ``read``: the object and its generation (None when absent).
- ``create``: create-if-absent (``if_generation_match=0``). The body carries a
  fresh ``_token``; when a write's response is lost and the client library's retry
  meets 412, the object is read back and the token tells our own write from
  someone else's.
- ``swap``: compare-and-swap on the generation read, with the same token check.
- ``delete``: absent is fine; with a generation, only that version goes.
- ``names`` / ``folders``: one listing, optionally from an offset (windows and
  cursors keep ticks from listing history).

Every call passes ``retry.storage()``: the Storage client retries 429, 5xx and
timeouts within the deadline, then ``TransientError`` surfaces. Conditional writes
are safe to repeat; ``write_text`` is the one unconditional write, for whole
objects whose writer would repeat them as is (``dicomflow.retry`` states the rule).
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterable, Mapping

from google.api_core import exceptions as gexc
from google.cloud import storage

from dicomflow import retry
from dicomflow.json_types import JSON

TOKEN = "_token"
# Objects per listing call: Cloud Storage's default and most. Asked for explicitly so that
# fake-gcs-server, which otherwise answers a listing in one page, pages as the service does.
PAGE = 1000


def dumps(doc: JSON) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def read(
    bucket: storage.Bucket, name: str, deadline: float = retry.DEADLINE
) -> tuple[JSON, int] | None:
    """The JSON object ``name`` and its generation, or None when absent."""
    blob = bucket.blob(name)
    try:
        raw = blob.download_as_bytes(retry=retry.storage(deadline), timeout=deadline)
    except gexc.NotFound:
        return None
    doc: JSON = json.loads(raw)
    return doc, int(blob.generation or 0)


def read_json(bucket: storage.Bucket, name: str) -> JSON | None:
    """The JSON object ``name``, or None when absent."""
    found = read(bucket, name)
    return found[0] if found is not None else None


def _upload(
    bucket: storage.Bucket,
    name: str,
    body: str,
    generation: int,
    content_type: str,
    metadata: Mapping[str, str] | None = None,
) -> int:
    blob = bucket.blob(name)
    if metadata:
        blob.metadata = dict(metadata)
    blob.upload_from_string(
        body,
        content_type=content_type,
        if_generation_match=generation,
        retry=retry.storage(),
        timeout=retry.DEADLINE,
    )
    return int(blob.generation or 0)


def create(
    bucket: storage.Bucket,
    name: str,
    doc: JSON,
    metadata: Mapping[str, str] | None = None,
) -> int | None:
    """Create ``name`` holding ``doc`` if absent; the generation written when the stored
    object is ours, None when someone else's was there first.

    ``doc`` is stored with a fresh ``_token`` (it replaces any token in ``doc``);
    ``metadata`` becomes the object's custom metadata, which listings return.
    """
    token = uuid.uuid4().hex
    body = {**doc, TOKEN: token}
    try:
        return _upload(bucket, name, dumps(body), 0, "application/json", metadata)
    except gexc.PreconditionFailed:
        found = read(bucket, name)
        return found[1] if found is not None and found[0].get(TOKEN) == token else None


def swap(bucket: storage.Bucket, name: str, doc: JSON, generation: int) -> int | None:
    """Write ``doc`` if ``name`` is still at ``generation`` (0: absent).

    Returns the new generation, or None when someone else changed the object first.
    """
    token = uuid.uuid4().hex
    try:
        return _upload(bucket, name, dumps({**doc, TOKEN: token}), generation, "application/json")
    except gexc.PreconditionFailed:
        found = read(bucket, name)
        if found is not None and found[0].get(TOKEN) == token:
            return found[1]
        return None


def write_text(bucket: storage.Bucket, name: str, text: str, content_type: str) -> None:
    """Replace ``name`` with ``text`` whatever it held (manifests rewritten whole).

    Unconditional, and still retried: only for text whose writer would write it again
    as is, so that a repeat after a lost answer changes nothing (``dicomflow.retry``).
    """
    blob = bucket.blob(name)
    blob.upload_from_string(
        text, content_type=content_type, retry=retry.storage(), timeout=retry.DEADLINE
    )


def read_text(bucket: storage.Bucket, name: str) -> str | None:
    blob = bucket.blob(name)
    try:
        text: str = blob.download_as_text(retry=retry.storage(), timeout=retry.DEADLINE)
        return text
    except gexc.NotFound:
        return None


def ndjson(lines: Iterable[JSON]) -> str:
    """One compact JSON object per line."""
    return "".join(dumps(line) + "\n" for line in lines)


def read_ndjson(bucket: storage.Bucket, name: str) -> list[JSON] | None:
    """The lines of an NDJSON object, or None when absent."""
    text = read_text(bucket, name)
    if text is None:
        return None
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def create_text(bucket: storage.Bucket, name: str, text: str, content_type: str) -> bool:
    """Create ``name`` holding ``text`` if absent; False when it existed.

    For content that is the same whoever writes it (a listing's file list): a 412
    after a lost response means the same text is stored, so no token is needed.
    """
    try:
        _upload(bucket, name, text, 0, content_type)
    except gexc.PreconditionFailed:
        return False
    return True


def delete(bucket: storage.Bucket, name: str, generation: int | None = None) -> bool:
    """Delete ``name`` (only ``generation`` when given); absent or moved on is fine.

    True when this call deleted it (a retry after a lost answer reads as absent: False).
    """
    blob = bucket.blob(name)
    with contextlib.suppress(gexc.NotFound, gexc.PreconditionFailed):
        blob.delete(if_generation_match=generation, retry=retry.storage(), timeout=retry.DEADLINE)
        return True
    return False


def exists(bucket: storage.Bucket, name: str) -> bool:
    return bool(bucket.blob(name).exists(retry=retry.storage(), timeout=retry.DEADLINE))


def blobs(
    bucket: storage.Bucket,
    prefix: str,
    start_offset: str | None = None,
    end_offset: str | None = None,
) -> list[storage.Blob]:
    """Every object under ``prefix`` (from ``start_offset``, before ``end_offset``), with
    its metadata: one listing call per 1,000 objects."""
    return list(
        bucket.client.list_blobs(
            bucket,
            prefix=prefix,
            start_offset=start_offset,
            end_offset=end_offset,
            page_size=PAGE,
            retry=retry.storage(),
            timeout=retry.DEADLINE,
        )
    )


def names(bucket: storage.Bucket, prefix: str, start_offset: str | None = None) -> list[str]:
    """The names of the objects under ``prefix``, in order."""
    return [b.name for b in blobs(bucket, prefix, start_offset)]


def folders(bucket: storage.Bucket, prefix: str, start_offset: str | None = None) -> list[str]:
    """The next path parts under ``prefix`` (``prefix/<part>/...``), in order: one
    delimited listing, which returns one entry per folder rather than per object."""
    found = bucket.client.list_blobs(
        bucket,
        prefix=prefix,
        delimiter="/",
        start_offset=start_offset,
        page_size=PAGE,
        retry=retry.storage(),
        timeout=retry.DEADLINE,
    )
    for _ in found:
        pass
    return sorted(p[len(prefix) :].strip("/") for p in found.prefixes)
