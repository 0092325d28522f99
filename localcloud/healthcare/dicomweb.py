"""DICOMweb under ``.../dicomStores/{s}/dicomWeb/``: QIDO-RS, WADO-RS, STOW-RS and deletes.

Searches match on the attributes the index keeps (UIDs, PatientID,
PatientName with ``*``/``?`` wildcards, StudyDate ranges, Modality,
AccessionNumber and the other indexed attributes), and honour
``includefield``, ``limit`` and ``offset``. Attributes named in
``includefield`` that the index lacks are read from the stored file.
Retrieves answer in Explicit VR Little Endian unless the Accept header asks
for another transfer syntax, or for ``*`` (the stored bytes); an empty search
is 204 No Content. docs/emulator.md lists each behaviour with its source.
"""

from __future__ import annotations

import email.parser
import email.policy
import fnmatch
import json
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pydicom.datadict

from localcloud.healthcare.fetch import examine
from localcloud.healthcare.importer import InstanceWriter
from localcloud.healthcare.instances import (
    EXPLICIT_LE,
    INDEX_KEYWORDS,
    INSTANCE_TAGS,
    SERIES_TAGS,
    STUDY_TAGS,
    InstanceRejected,
    full_json,
    raw_frames,
    read_dataset,
    render_frames,
    tag_hex,
    transcode,
)
from localcloud.healthcare.notifications import STORE_ACTION
from localcloud.healthcare.operations import Operations
from localcloud.healthcare.repository import Repository, StoredInstance
from localcloud.healthcare.status import ApiError, invalid, not_found

# dicomweb-client compares the media type exactly, without parameters.
DICOM_JSON = "application/dicom+json"
MAX_RESULTS = {"studies": 5000, "series": 5000, "instances": 50000}
_INDEXED = {tag_hex(k): k for k in INDEX_KEYWORDS}
_UID_KEYS = {
    tag_hex(k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
}
_FAILURE_NOT_DICOM = 0xC000
_FAILURE_DUPLICATE = 0x0111
_FAILURE_STUDY_MISMATCH = 0xA900


@dataclass
class Reply:
    """An HTTP answer."""

    status: int
    body: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)


def json_reply(value: object, status: int = 200, content_type: str = DICOM_JSON) -> Reply:
    return Reply(status, json.dumps(value).encode(), content_type)


def _tag_of(key: str) -> str:
    """A QIDO key (keyword or 8 hex digits) as 8 upper-case hex digits."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", key):
        return key.upper()
    tag = pydicom.datadict.tag_for_keyword(key)
    if tag is None:
        raise invalid(f"unknown DICOM attribute {key!r} in the query")
    return f"{tag:08X}"


def _values(attributes: dict[str, Any], tag: str) -> list[str]:
    element = attributes.get(tag)
    if not element:
        return []
    out = []
    for value in element.get("Value", []):
        out.append(str(value.get("Alphabetic", "")) if isinstance(value, dict) else str(value))
    return out


def _matcher(tag: str, query: str) -> Callable[[dict[str, Any]], bool]:
    """A predicate on an instance's attributes for one QIDO key."""
    if tag in _UID_KEYS:
        wanted = {u.strip() for u in re.split(r"[,\\]", query) if u.strip()}
        return lambda a: bool(wanted.intersection(_values(a, tag)))
    if tag == tag_hex("StudyDate") and "-" in query:
        low, _, high = query.partition("-")
        low, high = low.strip() or "00000000", high.strip() or "99999999"
        return lambda a: any(low <= v <= high for v in _values(a, tag))
    if "*" in query or "?" in query:
        pattern = query.lower()
        return lambda a: any(fnmatch.fnmatchcase(v.lower(), pattern) for v in _values(a, tag))
    if tag == tag_hex("PatientName"):
        return lambda a: any(v.lower() == query.lower() for v in _values(a, tag))
    return lambda a: query in _values(a, tag)


def _element(vr: str, values: Sequence[object]) -> dict[str, Any]:
    return {"vr": vr, "Value": list(values)}


def _multipart(parts: Sequence[tuple[bytes, str]], part_type: str) -> Reply:
    boundary = secrets.token_hex(16)
    chunks: list[bytes] = []
    for payload, content_type in parts:
        chunks.append(f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode())
        chunks.append(payload)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return Reply(
        200,
        b"".join(chunks),
        f'multipart/related; type="{part_type}"; boundary={boundary}',
    )


def _accept_syntax(accept: str) -> str:
    """The transfer syntax an Accept header asks for.

    Google's DICOM conformance statement (Retrieve transaction) marks Explicit VR
    Little Endian as the default, so an Accept without ``transfer-syntax``, or no
    Accept at all, gets 1.2.840.10008.1.2.1; ``*`` keeps the stored bytes.
    """
    match = re.search(r"transfer-syntax\s*=\s*\"?([0-9.*]+)", accept)
    return match.group(1) if match else EXPLICIT_LE


def _single_part(accept: str) -> bool:
    """True when Accept asks for a bare ``application/dicom`` body rather than multipart.

    The conformance statement lists single-part ``application/dicom`` (with any of
    its transfer syntaxes, ``*`` included) for RetrieveInstance only.
    """
    media = [m.split(";", 1)[0].strip().lower() for m in accept.split(",") if m.strip()]
    return "application/dicom" in media and "multipart/related" not in media


def parse_multipart(body: bytes, content_type: str) -> list[bytes]:
    """The payloads of a multipart/related request body.

    Raises:
        ApiError: INVALID_ARGUMENT when the body is not well-formed multipart.
    """
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    if not message.is_multipart():
        raise invalid("the request body is not multipart/related")
    payloads = []
    for part in message.iter_parts():
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes):
            payloads.append(payload)
    return payloads


class DicomWeb:
    """The DICOMweb surface of every store."""

    def __init__(
        self,
        repository: Repository,
        writer: InstanceWriter,
        operations: Operations,
        base_url: Callable[[], str],
    ) -> None:
        self._repository = repository
        self._writer = writer
        self._operations = operations
        self._base_url = base_url

    def handle(
        self,
        method: str,
        version: str,
        store: str,
        parts: list[str],
        query: dict[str, list[str]],
        headers: dict[str, str],
        body: bytes,
    ) -> Reply:
        """Serve one request below ``dicomWeb/``; ``parts`` is the path split on '/'."""
        root = f"{self._base_url()}/{version}/{store}/dicomWeb"
        if method == "POST":
            if parts == ["studies"] or (len(parts) == 2 and parts[0] == "studies"):
                study = parts[1] if len(parts) == 2 else None
                return self.store(store, root, study, headers.get("content-type", ""), body)
            raise not_found(f"DICOMweb path {'/'.join(parts)}")
        if method == "DELETE":
            return self.delete(version, store, parts)
        if method != "GET":
            raise ApiError("UNIMPLEMENTED", f"{method} is not supported on DICOMweb paths")
        if parts and parts[-1] in ("studies", "series", "instances") and len(parts) % 2 == 1:
            return self.search(store, root, parts, query)
        return self.retrieve(store, root, parts, headers.get("accept", ""))

    # QIDO-RS

    def search(self, store: str, root: str, parts: list[str], query: dict[str, list[str]]) -> Reply:
        level = parts[-1]
        scope = dict(zip(parts[0:-1:2], parts[1:-1:2], strict=True))
        if set(scope) - {"studies", "series"} or (level == "studies" and scope):
            raise not_found(f"DICOMweb path {'/'.join(parts)}")
        rows = self._repository.query_instances(store, scope.get("studies"), scope.get("series"))
        includes: set[str] = set()
        limit, offset = MAX_RESULTS[level], 0
        matchers: list[Callable[[dict[str, Any]], bool]] = []
        for key, values in query.items():
            if key == "includefield":
                for value in values:
                    includes.update(v.strip() for v in value.split(",") if v.strip())
            elif key in ("limit", "offset"):
                try:
                    number = int(values[-1])
                except ValueError:
                    raise invalid(f"{key} must be an integer") from None
                if number < 0:
                    raise invalid(f"{key} must not be negative")
                if key == "limit":
                    limit = min(number, MAX_RESULTS[level])
                else:
                    offset = number
            elif key in ("fuzzymatching", "alt"):
                continue
            else:
                tag = _tag_of(key)
                if tag not in _INDEXED:
                    raise invalid(f"searching on {key} is not supported")
                matchers.extend(_matcher(tag, v) for v in values)
        matching = [r for r in rows if all(m(r.attributes) for m in matchers)]
        if level == "studies":
            results = self._group(matching, rows, "study", STUDY_TAGS, root)
        elif level == "series":
            results = self._group(matching, rows, "series", SERIES_TAGS, root)
        else:
            results = [(row, self._instance_result(row, root)) for row in matching]
        page = results[offset : offset + limit]
        if not page:
            # Google answers an empty search with 204 No Content, as its DICOMweb
            # samples and the gcloud CLI expect (PS3.18 has said 204 and 200 over time).
            return Reply(204, b"", DICOM_JSON)
        return json_reply([self._include(row, result, includes, level) for row, result in page])

    def _group(
        self,
        matching: list[StoredInstance],
        rows: list[StoredInstance],
        key: str,
        tags: frozenset[str],
        root: str,
    ) -> list[tuple[StoredInstance, dict[str, Any]]]:
        chosen: dict[str, StoredInstance] = {}
        for row in matching:
            chosen.setdefault(getattr(row, key), row)
        results = []
        for value, first in chosen.items():
            members = [r for r in rows if getattr(r, key) == value]
            result = {t: v for t, v in first.attributes.items() if t in tags}
            if key == "study":
                modalities = sorted({m for r in members for m in _values(r.attributes, "00080060")})
                result["00080061"] = _element("CS", modalities)
                result["00201206"] = _element("IS", [len({r.series for r in members})])
                result["00201208"] = _element("IS", [len(members)])
                result["00081190"] = _element("UR", [f"{root}/studies/{first.study}"])
            else:
                result["00201209"] = _element("IS", [len(members)])
                result["00081190"] = _element(
                    "UR", [f"{root}/studies/{first.study}/series/{first.series}"]
                )
            results.append((first, result))
        return results

    def _instance_result(self, row: StoredInstance, root: str) -> dict[str, Any]:
        keep = INSTANCE_TAGS | {"0020000D", "0020000E", "00080060"}
        result = {t: v for t, v in row.attributes.items() if t in keep}
        result["00083002"] = _element("UI", [row.syntax])
        result["00081190"] = _element(
            "UR", [f"{root}/studies/{row.study}/series/{row.series}/instances/{row.sop}"]
        )
        return result

    def _include(
        self, row: StoredInstance, result: dict[str, Any], includes: set[str], level: str
    ) -> dict[str, Any]:
        if not includes:
            return dict(sorted(result.items()))
        wanted = set(row.attributes) if "all" in includes else {_tag_of(i) for i in includes}
        missing = {t for t in wanted if t not in row.attributes and t not in result}
        extra = {t: v for t, v in row.attributes.items() if t in wanted}
        if missing:
            # Not in the index: read it from the stored file, as the service returns it.
            header = full_json(self._repository.read_blob(row.sha256), "")
            extra.update({t: v for t, v in header.items() if t in missing and "Value" in v})
        merged = {**result, **extra}
        return dict(sorted(merged.items()))

    # WADO-RS

    def _instances_at(self, store: str, parts: list[str]) -> tuple[list[StoredInstance], list[str]]:
        """The instances a retrieve path names, and the rest of the path after them."""
        keys = ("studies", "series", "instances")
        ids: list[str] = []
        index = 0
        while index + 1 < len(parts) and len(ids) < 3 and parts[index] == keys[len(ids)]:
            ids.append(parts[index + 1])
            index += 2
        if not ids:
            raise not_found(f"DICOMweb path {'/'.join(parts)}")
        ids += [None] * (3 - len(ids))  # type: ignore[list-item]
        rows = self._repository.query_instances(store, ids[0], ids[1], ids[2])
        if not rows:
            raise not_found(f"DICOMweb resource {'/'.join(parts[:index])}")
        return rows, parts[index:]

    def retrieve(self, store: str, root: str, parts: list[str], accept: str) -> Reply:
        rows, rest = self._instances_at(store, parts)
        if rest == []:
            syntax = _accept_syntax(accept)
            try:
                blobs = [transcode(self._repository.read_blob(r.sha256), syntax) for r in rows]
            except InstanceRejected as exc:
                raise ApiError("FAILED_PRECONDITION", exc.message, 406) from None
            # Each part names the syntax it is in: the stored one when ``*`` kept it.
            types = [
                f"application/dicom; transfer-syntax={r.syntax if syntax == '*' else syntax}"
                for r in rows
            ]
            if len(parts) == 6 and _single_part(accept):
                return Reply(200, blobs[0], types[0])
            return _multipart(list(zip(blobs, types, strict=True)), "application/dicom")
        if rest == ["metadata"]:
            return json_reply(
                [
                    full_json(
                        self._repository.read_blob(r.sha256),
                        f"{root}/studies/{r.study}/series/{r.series}/instances/{r.sop}",
                    )
                    for r in rows
                ]
            )
        image_type = "image/png" if "image/png" in accept else "image/jpeg"
        instance_level = len(parts) - len(rest) == 6
        if instance_level and len(rest) == 2 and rest[0] == "bulkdata":
            return self._bulkdata(rows[0], rest[1])
        if rest == ["rendered"] and instance_level:
            return self._rendered(rows[0], image_type, None)
        if len(rest) >= 2 and rest[0] == "frames" and instance_level:
            try:
                numbers = [int(n) for n in rest[1].split(",")]
            except ValueError:
                raise invalid(f"invalid frame list {rest[1]!r}") from None
            if rest[2:] == ["rendered"] and len(numbers) == 1:
                return self._rendered(rows[0], image_type, numbers[0])
            if len(rest) == 2:
                try:
                    frames = raw_frames(self._repository.read_blob(rows[0].sha256))
                except InstanceRejected as exc:
                    raise invalid(exc.message) from None
                if any(not 1 <= n <= len(frames) for n in numbers):
                    raise not_found(f"frame {rest[1]}")
                return _multipart(
                    [(frames[n - 1], "application/octet-stream") for n in numbers],
                    "application/octet-stream",
                )
        raise not_found(f"DICOMweb path {'/'.join(parts)}")

    def _bulkdata(self, row: StoredInstance, tag: str) -> Reply:
        """The value behind a BulkDataURI that ``/metadata`` gave (``bulkdata/{tag}``)."""
        if not re.fullmatch(r"[0-9A-Fa-f]{8}", tag):
            raise not_found(f"bulk data {tag}")
        dataset = read_dataset(self._repository.read_blob(row.sha256))
        key = int(tag, 16)
        value = dataset[key].value if key in dataset else None
        if not isinstance(value, bytes):
            raise not_found(f"bulk data {tag}")
        return _multipart([(value, "application/octet-stream")], "application/octet-stream")

    def _rendered(self, row: StoredInstance, image_type: str, frame: int | None) -> Reply:
        try:
            images = render_frames(self._repository.read_blob(row.sha256), image_type, frame or 1)
        except InstanceRejected as exc:
            raise invalid(exc.message) from None
        return Reply(200, images[0], image_type)

    # STOW-RS

    def store(
        self, store: str, root: str, study: str | None, content_type: str, body: bytes
    ) -> Reply:
        if content_type.lower().startswith("multipart/related"):
            payloads = parse_multipart(body, content_type)
        elif content_type.lower().startswith("application/dicom"):
            payloads = [body]
        else:
            raise ApiError(
                "INVALID_ARGUMENT",
                'STOW-RS needs Content-Type multipart/related; type="application/dicom"',
                415,
            )
        candidates = [examine(f"part {i + 1}", p) for i, p in enumerate(payloads)]
        accepted = []
        failed: list[dict[str, Any]] = []
        for candidate in candidates:
            parsed = candidate.parsed
            if parsed is not None and study is not None and parsed.study_uid != study:
                failed.append(
                    self._failure(parsed.sop_class_uid, parsed.sop_uid, _FAILURE_STUDY_MISMATCH)
                )
            else:
                accepted.append(candidate)
        referenced = []
        for outcome in self._writer.store(store, accepted, STORE_ACTION):
            parsed = outcome.parsed
            if outcome.ok and parsed is not None:
                url = (
                    f"{root}/studies/{parsed.study_uid}/series/{parsed.series_uid}"
                    f"/instances/{parsed.sop_uid}"
                )
                referenced.append(
                    {
                        "00081150": _element("UI", [parsed.sop_class_uid]),
                        "00081155": _element("UI", [parsed.sop_uid]),
                        "00081190": _element("UR", [url]),
                    }
                )
            elif parsed is not None:
                failed.append(
                    self._failure(parsed.sop_class_uid, parsed.sop_uid, _FAILURE_DUPLICATE)
                )
            else:
                failed.append(self._failure(None, None, _FAILURE_NOT_DICOM))
        result: dict[str, Any] = {}
        if study is not None:
            result["00081190"] = _element("UR", [f"{root}/studies/{study}"])
        if referenced:
            result["00081199"] = _element("SQ", referenced)
        if failed:
            result["00081198"] = _element("SQ", failed)
        status = 200 if not failed else (202 if referenced else 409)
        return json_reply(result, status)

    @staticmethod
    def _failure(sop_class: str | None, sop: str | None, reason: int) -> dict[str, Any]:
        item: dict[str, Any] = {"00081197": _element("US", [reason])}
        if sop_class:
            item["00081150"] = _element("UI", [sop_class])
        if sop:
            item["00081155"] = _element("UI", [sop])
        return item

    # Deletes

    def delete(self, version: str, store: str, parts: list[str]) -> Reply:
        keys = parts[0::2]
        ids = parts[1::2]
        if len(parts) % 2 or keys != ["studies", "series", "instances"][: len(keys)] or not keys:
            raise not_found(f"DICOMweb path {'/'.join(parts)}")
        padded: list[str | None] = [*ids, None, None]
        study, series, sop = padded[0], padded[1], padded[2]
        assert study is not None
        if not self._repository.query_instances(store, study, series, sop):
            raise not_found(f"DICOMweb resource {'/'.join(parts)}")
        if sop is not None:
            self._repository.delete_instances(store, study, series, sop)
            return json_reply({}, content_type="application/json; charset=UTF-8")
        dataset = store.rsplit("/dicomStores/", 1)[0]
        kind = "dicomWeb.delete" if series is None else "dicomWeb.deleteSeries"

        def work(_: object) -> dict[str, Any] | None:
            self._repository.delete_instances(store, study, series)
            return None

        body = self._operations.start(dataset, kind, version, work)
        return json_reply(body, content_type="application/json; charset=UTF-8")
