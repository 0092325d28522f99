"""Cloud Storage's preconditions, enforced in front of fake-gcs-server.

fake-gcs-server checks ``ifGenerationMatch`` only on small uploads and ignores every
other precondition; the pipeline's claims rest on them. ``StorageFront`` checks each
precondition under a lock per object and forwards the request without it, and also
enforces bucket retention policies, refuses names with CR or LF and counts
metagenerations. ``localcloud.storage.start_storage`` starts it.

See docs/architecture.md#storage-front
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, parse_qsl, quote, unquote, urlencode, urlsplit

from localcloud.proxy import LoopbackProxy, Reply, Request, Upstream, google_error

CONDITIONS = (
    "ifGenerationMatch",
    "ifGenerationNotMatch",
    "ifMetagenerationMatch",
    "ifMetagenerationNotMatch",
)
_SOURCE_CONDITIONS = {f"ifSource{name[2:]}": name for name in CONDITIONS}
_HEADER_CONDITIONS = {
    "x-goog-if-generation-match": "ifGenerationMatch",
    "x-goog-if-metageneration-match": "ifMetagenerationMatch",
}
_STRIPPED = frozenset({*CONDITIONS, *_SOURCE_CONDITIONS})
# Cloud Storage's own words for a failed precondition.
_NOT_MET = "At least one of the pre-conditions you specified did not hold."
# What replaces or deletes a live object (a retention policy refuses it while young).
_REPLACING = frozenset({"insert", "finalize", "rewrite", "copy", "compose", "delete"})

ObjectKey = tuple[str, str]


@dataclass(frozen=True)
class Live:
    """An object's live version; generation 0 means there is none."""

    generation: int
    metageneration: int


ABSENT = Live(0, 0)


def failed_condition(conditions: dict[str, int], live: Live) -> str | None:
    """The first condition that ``live`` breaks, or None when all hold."""
    for name, want in conditions.items():
        have = live.metageneration if "Metageneration" in name else live.generation
        if (have == want) != name.endswith("NotMatch"):
            continue
        return name
    return None


def precondition_failed() -> Reply:
    """412 exactly as Cloud Storage words it; the client raises PreconditionFailed."""
    return google_error(
        412,
        _NOT_MET,
        [
            {
                "message": _NOT_MET,
                "domain": "global",
                "reason": "conditionNotMet",
                "locationType": "header",
                "location": "If-Match",
            }
        ],
    )


def retention_not_met(bucket: str, name: str, until: datetime) -> Reply:
    """403 as Cloud Storage answers a replace or delete of an object under retention."""
    stamp = until.astimezone(UTC).isoformat().replace("+00:00", "Z")
    message = (
        f"Object '{bucket}/{name}' is subject to bucket's retention policy and cannot be "
        f"deleted, overwritten or archived until {stamp}"
    )
    return google_error(
        403,
        message,
        [{"message": message, "domain": "global", "reason": "retentionPolicyNotMet"}],
    )


def _rfc3339(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# Cloud Storage refuses object names holding a carriage return or a line feed, in these
# words (JSON API, 400, reason "invalid"); fake-gcs-server stores them.
_FORBIDDEN_NAME = "Disallowed unicode characters present in object name"


def forbidden_name(name: str) -> bool:
    """True for an object name Cloud Storage refuses to create (CR or LF in it)."""
    return "\r" in name or "\n" in name


def invalid_name() -> Reply:
    """400 as Cloud Storage answers a write of a forbidden name."""
    return google_error(
        400,
        _FORBIDDEN_NAME,
        [{"message": _FORBIDDEN_NAME, "domain": "global", "reason": "invalid"}],
    )


def _conditions(request: Request, names: dict[str, str]) -> dict[str, int]:
    found: dict[str, int] = {}
    for param, name in names.items():
        raw = request.param(param)
        if raw is not None and raw.lstrip("-").isdigit():
            found[name] = int(raw)
    return found


@dataclass
class _Operation:
    """One object request the front must serialise, and what it asks for."""

    kind: str  # insert, resumable, finalize, rewrite, copy, compose, delete, patch, read
    target: ObjectKey
    conditions: dict[str, int]
    source: ObjectKey | None = None
    source_conditions: dict[str, int] = field(default_factory=dict)
    source_generation: int | None = None
    # compose: (source, its ifGenerationMatch)
    parts: list[tuple[ObjectKey, int]] = field(default_factory=list)
    upload_id: str | None = None
    # delete and patch: the version asked for (fake-gcs-server deletes the live one regardless)
    generation: int | None = None

    @property
    def creates(self) -> bool:
        """Whether an absent target is generation 0 (else the upstream's 404 stands)."""
        return self.kind in ("insert", "resumable", "finalize", "rewrite", "copy", "compose")

    def keys(self) -> list[ObjectKey]:
        found = {self.target, *(key for key, _ in self.parts)}
        if self.source is not None:
            found.add(self.source)
        return sorted(found)


@dataclass(frozen=True)
class _Session:
    target: ObjectKey
    conditions: dict[str, int]


def _body_name(request: Request) -> str | None:
    """The object name in a JSON body, or in the JSON first part of a multipart body."""
    body = request.body
    content_type = request.header("Content-Type") or ""
    if content_type.startswith("multipart/"):
        boundary = content_type.partition("boundary=")[2].strip().strip('"')
        if not boundary:
            return None
        first = body.split(b"--" + boundary.encode(), 2)
        if len(first) < 2:
            return None
        body = first[1].partition(b"\r\n\r\n")[2]
    try:
        name = json.loads(body or b"{}").get("name")
    except (ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def is_last_chunk(request: Request) -> bool:
    """Whether a resumable upload's PUT completes the upload."""
    # "bytes 0-99/100" and "bytes */100" finish an upload; "bytes 0-99/*" does not.
    content_range = request.header("Content-Range")
    if content_range is None:
        return True
    total = content_range.rpartition("/")[2].strip()
    if total == "*":
        return False
    span = content_range.partition(" ")[2].partition("/")[0]
    if span == "*":
        return True
    return (
        total.isdigit()
        and span.partition("-")[2].isdigit()
        and (int(span.partition("-")[2]) + 1 == int(total))
    )


def _path_parts(path: str, lead: str) -> list[str]:
    # Object names travel percent-encoded, so a "/" in the path always separates parts.
    return [unquote(part) for part in path[len(lead) :].split("/")]


def _object_path(bucket: str, name: str) -> str:
    return f"/storage/v1/b/{quote(bucket, safe='')}/o/{quote(name, safe='')}"


class StorageFront(LoopbackProxy):
    """Forwards to fake-gcs-server and enforces Cloud Storage's preconditions on the way."""

    def __init__(
        self,
        upstream: str,
        port: int = 0,
        retention: Mapping[str, int] | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        super().__init__(upstream, port, sock)
        self._guard = threading.Lock()
        # bucket -> (retention period in seconds, when the policy took effect)
        now = datetime.now(UTC)
        self._retention: dict[str, tuple[int, datetime]] = {
            bucket: (seconds, now) for bucket, seconds in (retention or {}).items() if seconds > 0
        }
        self._locks: dict[ObjectKey, tuple[threading.Lock, int]] = {}
        self._sessions: dict[str, _Session] = {}
        # (bucket, name) -> (generation, metageneration), for objects whose metadata changed.
        self._metagenerations: dict[ObjectKey, tuple[int, int]] = {}

    def start(self) -> StorageFront:
        super().start()
        return self

    # -- locks --------------------------------------------------------------

    @contextmanager
    def _hold(self, keys: list[ObjectKey]) -> Iterator[None]:
        # Sorted keys, so two requests that lock the same pair cannot deadlock.
        taken: list[ObjectKey] = []
        try:
            for key in keys:
                with self._guard:
                    lock, users = self._locks.get(key, (threading.Lock(), 0))
                    self._locks[key] = (lock, users + 1)
                lock.acquire()
                taken.append(key)
            yield
        finally:
            for key in reversed(taken):
                with self._guard:
                    lock, users = self._locks[key]
                    lock.release()
                    if users == 1:
                        del self._locks[key]
                    else:
                        self._locks[key] = (lock, users - 1)

    # -- requests -----------------------------------------------------------

    def handle(self, request: Request, upstream: Upstream) -> Reply:
        operation = self._parse(request)
        if operation is not None and operation.creates and forbidden_name(operation.target[1]):
            return invalid_name()
        if operation is None:
            reply = super().handle(request, upstream)
            if 200 <= reply.status < 300:
                reply = self._bucket_retention(request, reply)
        else:
            with self._hold(operation.keys()):
                reply = self._guarded(operation, request, upstream)
        if self._metagenerations and 200 <= reply.status < 300:
            reply = self._with_metagenerations(request, reply)
        return reply

    def _parse(self, request: Request) -> _Operation | None:
        method, path = request.method, request.path
        conditions = _conditions(request, {name: name for name in CONDITIONS})
        for header, name in _HEADER_CONDITIONS.items():
            raw = request.header(header)
            if raw is not None and raw.isdigit():
                conditions.setdefault(name, int(raw))
        if path.startswith("/upload/storage/v1/b/"):
            return self._parse_upload(request, conditions)
        if path.startswith("/download/storage/v1/b/"):
            parts = _path_parts(path, "/download/storage/v1/b/")
            if method != "GET" or not conditions or len(parts) != 3 or parts[1] != "o":
                return None
            return _Operation("read", (parts[0], parts[2]), conditions)
        if not path.startswith("/storage/v1/b/"):
            return None
        parts = _path_parts(path, "/storage/v1/b/")
        if len(parts) == 2 and parts[1] == "o":
            # objects.insert without media: the name is in the JSON body.
            inserted = _body_name(request) if method == "POST" else None
            return _Operation("insert", (parts[0], inserted), conditions) if inserted else None
        if len(parts) < 3 or parts[1] != "o" or not parts[2]:
            return None
        target = (parts[0], parts[2])
        if method == "GET":
            return _Operation("read", target, conditions) if conditions else None
        # SOURCE_BUCKET/o/SOURCE/rewriteTo/b/BUCKET/o/NAME (or copyTo)
        if len(parts) == 8 and parts[3] in ("rewriteTo", "copyTo") and parts[4::2] == ["b", "o"]:
            source_generation = request.param("sourceGeneration")
            return _Operation(
                "rewrite" if parts[3] == "rewriteTo" else "copy",
                (parts[5], parts[7]),
                conditions,
                source=target,
                source_conditions=_conditions(request, _SOURCE_CONDITIONS),
                source_generation=int(source_generation)
                if source_generation and source_generation.isdigit()
                else None,
            )
        if len(parts) == 4 and parts[3] == "compose" and method == "POST":
            return _Operation("compose", target, conditions, parts=_compose_parts(request))
        if len(parts) != 3:
            return None
        generation = request.param("generation")
        version = int(generation) if generation and generation.isdigit() else None
        if method == "DELETE":
            return _Operation("delete", target, conditions, generation=version)
        if method in ("PATCH", "PUT"):
            return _Operation("patch", target, conditions, generation=version)
        return None

    def _parse_upload(self, request: Request, conditions: dict[str, int]) -> _Operation | None:
        bucket, _, rest = request.path[len("/upload/storage/v1/b/") :].partition("/")
        if rest.strip("/") != "o":
            return None
        upload_id = request.param("upload_id")
        if upload_id is not None:
            with self._guard:
                session = self._sessions.get(upload_id)
            if session is None or request.method != "PUT" or not is_last_chunk(request):
                return None
            return _Operation("finalize", session.target, session.conditions, upload_id=upload_id)
        if request.method != "POST":
            return None
        name = request.param("name") or _body_name(request)
        if name is None:
            return None
        kind = "resumable" if request.param("uploadType") == "resumable" else "insert"
        return _Operation(kind, (unquote(bucket), name), conditions)

    def _live(self, upstream: Upstream, key: ObjectKey) -> Live | None:
        """The live version of ``key``: ABSENT when there is none, None when the lookup failed."""
        reply = upstream.send("GET", _object_path(*key), [])
        if reply.status == 404:
            return ABSENT
        if reply.status != 200:
            return None
        resource = reply.json()
        generation = int(resource["generation"])
        metageneration = int(resource.get("metageneration") or 1)
        with self._guard:
            counted = self._metagenerations.get(key)
        if counted is not None and counted[0] == generation:
            metageneration = counted[1]
        return Live(generation, metageneration)

    def _retained_until(self, upstream: Upstream, key: ObjectKey) -> datetime | None:
        """Until when the live object ``key`` is under its bucket's retention policy, or
        None when it is not (no policy, no live object, or old enough)."""
        with self._guard:
            policy = self._retention.get(key[0])
        if policy is None:
            return None
        reply = upstream.send("GET", _object_path(*key), [])
        if reply.status != 200:
            return None
        created = reply.json().get("timeCreated")
        if not isinstance(created, str):
            return None
        until = _rfc3339(created) + timedelta(seconds=policy[0])
        return until if until > datetime.now(UTC) else None

    def _bucket_retention(self, request: Request, reply: Reply) -> Reply:
        """Keep a bucket's ``retentionPolicy`` from its insert, patch or update, and show it
        in the bucket resources of the reply."""
        parts = _path_parts(request.path, "/storage/v1/b/") if request.path else []
        writes = request.method in ("POST", "PATCH", "PUT") and request.path.startswith(
            "/storage/v1/b"
        )
        if writes and (request.path.rstrip("/") == "/storage/v1/b" or len(parts) == 1):
            try:
                body = json.loads(request.body or b"{}")
            except ValueError:
                body = {}
            bucket = body.get("name") if request.method == "POST" else parts[0]
            if isinstance(body, dict) and "retentionPolicy" in body and isinstance(bucket, str):
                period = int((body["retentionPolicy"] or {}).get("retentionPeriod") or 0)
                with self._guard:
                    if period > 0:
                        self._retention[bucket] = (period, datetime.now(UTC))
                    else:
                        self._retention.pop(bucket, None)
        value = _json_object(reply) if request.path.startswith("/storage/v1/b") else None
        if not self._retention or value is None:
            return reply
        resources = [value, *(value.get("items") or [])]
        changed = False
        with self._guard:
            for resource in resources:
                if not isinstance(resource, dict) or resource.get("kind") != "storage#bucket":
                    continue
                policy = self._retention.get(str(resource.get("name")))
                if policy is not None:
                    resource["retentionPolicy"] = {
                        "retentionPeriod": str(policy[0]),
                        "effectiveTime": policy[1].isoformat().replace("+00:00", "Z"),
                    }
                    changed = True
        return reply.with_json(value) if changed else reply

    def _guarded(self, operation: _Operation, request: Request, upstream: Upstream) -> Reply:
        if operation.kind in _REPLACING:
            until = self._retained_until(upstream, operation.target)
            if until is not None:
                return retention_not_met(*operation.target, until)
        live: Live | None = None
        if operation.conditions or operation.kind == "patch" or operation.generation is not None:
            live = self._live(upstream, operation.target)
            if live is None:
                return self._forward(request, upstream)
            if operation.generation not in (None, live.generation):
                return google_error(404, "No such object: " + "/".join(operation.target))
            if live != ABSENT or operation.creates:
                failed = failed_condition(operation.conditions, live)
                if failed is not None:
                    if operation.kind == "read" and failed.endswith("NotMatch"):
                        return google_error(304, "Not Modified")
                    return precondition_failed()
        if operation.source is not None and (
            operation.source_conditions or operation.source_generation is not None
        ):
            source = self._live(upstream, operation.source)
            if source is not None and source != ABSENT:
                if operation.source_generation not in (None, source.generation):
                    return google_error(404, "No such object: " + "/".join(operation.source))
                if failed_condition(operation.source_conditions, source) is not None:
                    return precondition_failed()
        for key, want in operation.parts:
            part = self._live(upstream, key)
            if part is not None and part != ABSENT and part.generation != want:
                return precondition_failed()
        reply = self._forward(request, upstream)
        if not 200 <= reply.status < 300:
            return reply
        if operation.kind == "patch":
            # fake-gcs-server answers a patch with a partial resource (no kind, no
            # metageneration, no timeCreated); Cloud Storage answers with the whole object.
            host = [("Host", value) for value in [request.header("Host")] if value]
            fresh = upstream.send("GET", _object_path(*operation.target), host)
            if fresh.status == 200:
                reply = Reply(reply.status, reply.reason, fresh.headers, fresh.body)
        with self._guard:
            if operation.kind == "patch" and live is not None and live != ABSENT:
                self._metagenerations[operation.target] = (
                    live.generation,
                    live.metageneration + 1,
                )
            elif operation.kind in ("delete", "insert", "finalize", "rewrite", "copy", "compose"):
                self._metagenerations.pop(operation.target, None)
            if operation.kind == "finalize" and operation.upload_id is not None:
                self._sessions.pop(operation.upload_id, None)
            if operation.kind == "resumable":
                location = reply.header("Location") or ""
                upload_id = parse_qs(urlsplit(location).query).get("upload_id")
                if upload_id:
                    self._sessions[upload_id[0]] = _Session(operation.target, operation.conditions)
        return reply

    def _forward(self, request: Request, upstream: Upstream) -> Reply:
        """Forward without the preconditions: the front has checked them, under the lock."""
        target = request.target
        if any(name in request.params for name in _STRIPPED):
            kept = [
                (k, v)
                for k, v in parse_qsl(request.query, keep_blank_values=True)
                if k not in _STRIPPED
            ]
            target = request.path + ("?" + urlencode(kept) if kept else "")
        headers = [(k, v) for k, v in request.headers if k.lower() not in _HEADER_CONDITIONS]
        return upstream.send(request.method, target, headers, request.body)

    def _with_metagenerations(self, request: Request, reply: Reply) -> Reply:
        """Write the counted metagenerations into the object resources of a JSON reply."""
        if request.param("alt") == "media" or request.path.startswith("/download/"):
            return reply
        value = _json_object(reply)
        if value is None:
            return reply
        resources: list[dict[str, Any]] = [value]
        if isinstance(value.get("resource"), dict):
            resources.append(value["resource"])
        if isinstance(value.get("items"), list):
            resources.extend(item for item in value["items"] if isinstance(item, dict))
        changed = False
        with self._guard:
            for resource in resources:
                if resource.get("kind") != "storage#object":
                    continue
                key = (str(resource.get("bucket")), str(resource.get("name")))
                counted = self._metagenerations.get(key)
                if counted is not None and str(counted[0]) == str(resource.get("generation")):
                    resource["metageneration"] = str(counted[1])
                    changed = True
        return reply.with_json(value) if changed else reply


def _json_object(reply: Reply) -> dict[str, Any] | None:
    """The reply's JSON object, or None when it carries none."""
    if not (reply.header("Content-Type") or "").startswith("application/json"):
        return None
    try:
        value = reply.json()
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _compose_parts(request: Request) -> list[tuple[ObjectKey, int]]:
    """Each compose source that carries ``objectPreconditions.ifGenerationMatch``."""
    bucket = unquote(request.path[len("/storage/v1/b/") :].split("/")[0])
    try:
        sources = json.loads(request.body or b"{}").get("sourceObjects") or []
    except (ValueError, AttributeError):
        return []
    found: list[tuple[ObjectKey, int]] = []
    for source in sources:
        want = (source.get("objectPreconditions") or {}).get("ifGenerationMatch")
        if isinstance(source.get("name"), str) and want is not None:
            found.append(((bucket, source["name"]), int(want)))
    return found


def main(argv: list[str] | None = None) -> None:
    """``python -m localcloud.storagefront --upstream URL (--port N | --fd FD)``: serve until
    killed; ``--fd`` serves on an inherited socket, bound and listening."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--upstream", required=True, help="fake-gcs-server, http://HOST:PORT")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--port", type=int, default=0, help="the port clients use")
    where.add_argument("--fd", type=int, default=None, help="a listening socket to serve on")
    parser.add_argument(
        "--retention",
        action="append",
        default=[],
        metavar="BUCKET=SECONDS",
        help="a bucket's retention period (repeatable)",
    )
    args = parser.parse_args(argv)
    retention = {}
    for item in args.retention:
        bucket, _, seconds = item.partition("=")
        if not bucket or not seconds.isdigit():
            parser.error(f"--retention {item!r}: use BUCKET=SECONDS")
        retention[bucket] = int(seconds)
    sock = None if args.fd is None else socket.socket(fileno=args.fd)
    front = StorageFront(args.upstream, args.port, retention, sock)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        front.serve()
    finally:
        front.stop()


if __name__ == "__main__":
    main()
