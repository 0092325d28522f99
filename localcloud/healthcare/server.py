"""The HTTP server: routing of the v1 and v1beta1 REST surface, errors, knobs.

Paths are served under ``/v1/`` and ``/v1beta1/`` alike. Non-Google endpoints
live under ``/_emulator/``: ``GET|POST /_emulator/knobs`` and
``GET /_emulator/logs/{operation name}`` (the operation's ``logsUrl``).
Request logs carry the method and path only: query strings can hold patient
names.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass
from functools import partialmethod
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from localcloud.healthcare import iam
from localcloud.healthcare.dicomweb import DicomWeb, Reply, json_reply
from localcloud.healthcare.exporter import parse_mime_type, run_export
from localcloud.healthcare.fetch import FetchPool
from localcloud.healthcare.gcs import StorageAccess, split_gcs_uri
from localcloud.healthcare.importer import InstanceWriter, run_import
from localcloud.healthcare.knobs import Knobs
from localcloud.healthcare.notifications import Notifier
from localcloud.healthcare.operations import Operations, now_rfc3339
from localcloud.healthcare.repository import Repository
from localcloud.healthcare.status import ApiError, invalid, not_found, status_for_http
from localcloud.healthcare.wildcards import parse_gcs_source
from localcloud.ports import HOST, serve_on

log = logging.getLogger(__name__)

JSON = "application/json; charset=UTF-8"
_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,256}$")
_STORE_FIELDS = {"name", "labels", "notificationConfig", "notificationConfigs", "streamConfigs"}
_PATCHABLE = _STORE_FIELDS - {"name"}
_DATASET_PATCHABLE = {"timeZone"}
_LOCATION = r"projects/(?P<p>[^/]+)/locations/(?P<l>[^/]+)"
_DATASET = _LOCATION + r"/datasets/(?P<d>[^/:]+)"
_STORE = _DATASET + r"/dicomStores/(?P<s>[^/:]+)"
ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (m, re.compile(f"^{pattern}$"), method)
    for m, pattern, method in (
        ("POST", _LOCATION + "/datasets", "datasets.create"),
        ("GET", _LOCATION + "/datasets", "datasets.list"),
        ("GET", _DATASET, "datasets.get"),
        ("PATCH", _DATASET, "datasets.patch"),
        ("DELETE", _DATASET, "datasets.delete"),
        ("GET", _DATASET + ":getIamPolicy", "datasets.getIamPolicy"),
        ("POST", _DATASET + ":setIamPolicy", "datasets.setIamPolicy"),
        ("POST", _DATASET + ":testIamPermissions", "datasets.testIamPermissions"),
        ("POST", _DATASET + "/dicomStores", "dicomStores.create"),
        ("GET", _DATASET + "/dicomStores", "dicomStores.list"),
        ("GET", _STORE, "dicomStores.get"),
        ("PATCH", _STORE, "dicomStores.patch"),
        ("DELETE", _STORE, "dicomStores.delete"),
        ("GET", _STORE + ":getIamPolicy", "dicomStores.getIamPolicy"),
        ("POST", _STORE + ":setIamPolicy", "dicomStores.setIamPolicy"),
        ("POST", _STORE + ":testIamPermissions", "dicomStores.testIamPermissions"),
        ("POST", _STORE + ":import", "import"),
        ("POST", _STORE + ":export", "export"),
        ("GET", _DATASET + "/operations", "operations.list"),
        ("GET", _DATASET + r"/operations/(?P<o>[^/:]+)", "operations.get"),
        ("POST", _DATASET + r"/operations/(?P<o>[^/:]+):cancel", "operations.cancel"),
    )
]
# Methods of the v1 discovery document that the emulator does not serve: they answer
# 501 UNIMPLEMENTED naming the method, rather than a 404 that reads as "resource missing".
UNIMPLEMENTED: list[tuple[re.Pattern[str], str]] = [
    (re.compile(f"^{pattern}$"), method)
    for pattern, method in (
        (_LOCATION, "locations.get"),
        (r"projects/[^/]+/locations", "locations.list"),
        (_DATASET + ":deidentify", "datasets.deidentify"),
        (_STORE + ":deidentify", "dicomStores.deidentify"),
        (_STORE + ":getDICOMStoreMetrics", "dicomStores.getDICOMStoreMetrics"),
        (_STORE + ":setBlobStorageSettings", "dicomStores.setBlobStorageSettings"),
        (_STORE + r"/dicomWeb/studies/[^/]+:getStudyMetrics", "dicomWeb.studies.getStudyMetrics"),
        (
            _STORE + r"/dicomWeb/studies/[^/]+:setBlobStorageSettings",
            "dicomWeb.studies.setBlobStorageSettings",
        ),
        (
            _STORE + r"/dicomWeb/studies/[^/]+/series/[^/]+:getSeriesMetrics",
            "dicomWeb.studies.series.getSeriesMetrics",
        ),
        (
            _STORE + r"/dicomWeb/studies/[^/]+/series/[^/]+/instances/[^/]+:getStorageInfo",
            "dicomWeb.studies.series.instances.getStorageInfo",
        ),
        (
            _DATASET + r"/(?P<kind>fhirStores|hl7V2Stores|consentStores|dataMapperWorkspaces)"
            r"(/.*)?",
            "{kind}",
        ),
        (_LOCATION + r"/services/.*", "services"),
    )
]
_DICOMWEB = re.compile(f"^{_STORE}/dicomWeb/(?P<rest>.*)$")
_DICOMWEB_METHODS = {"POST": "dicomWeb.store", "DELETE": "dicomWeb.delete"}


def default_import_workers() -> int:
    """Worker processes for imports: one per core, at least two."""
    return max(2, os.cpu_count() or 1)


def _page(
    items: list[dict[str, Any]], query: dict[str, list[str]], key: str, maximum: int
) -> dict[str, Any]:
    """One page of ``items`` with Google's pageSize / pageToken / nextPageToken."""
    try:
        size = int(query.get("pageSize", ["0"])[-1] or 0)
    except ValueError:
        raise invalid("pageSize must be an integer") from None
    if size < 0:
        raise invalid("pageSize must not be negative")
    size = min(size or 100, maximum)
    token = query.get("pageToken", [""])[-1]
    start = 0
    if token:
        try:
            start = int(base64.urlsafe_b64decode(token.encode()).decode().removeprefix("offset:"))
        except (ValueError, UnicodeDecodeError):
            raise invalid(f"invalid pageToken {token!r}") from None
    body: dict[str, Any] = {key: items[start : start + size]} if items[start : start + size] else {}
    if start + size < len(items):
        body["nextPageToken"] = base64.urlsafe_b64encode(f"offset:{start + size}".encode()).decode()
    return body


def _update_mask(call: Call) -> list[str]:
    mask = [m.strip() for m in call.query.get("updateMask", [""])[-1].split(",") if m.strip()]
    if not mask:
        raise invalid("updateMask is required")
    return mask


def _check_id(kind: str, value: str | None) -> str:
    if not value:
        raise invalid(f"{kind} is required")
    if not _ID.match(value):
        raise invalid(f"invalid {kind} {value!r}: use 1-256 letters, digits, '_', '-' or '.'")
    return value


@dataclass
class Call:
    """One parsed API request."""

    http_method: str
    version: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        if not self.body.strip():
            return {}
        try:
            value = json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            raise invalid("the request body is not valid JSON") from None
        if not isinstance(value, dict):
            raise invalid("the request body must be a JSON object")
        return value


class HealthcareApi:
    """The service behind the HTTP layer: resources, operations, DICOMweb and knobs."""

    def __init__(
        self,
        repository: Repository,
        storage: StorageAccess,
        knobs: Knobs,
        notifier: Notifier,
        fetch_pool: FetchPool,
    ) -> None:
        self.base_url = ""
        self.repository = repository
        self.storage = storage
        self.knobs = knobs
        self.notifier = notifier
        self.fetch_pool = fetch_pool
        self.writer = InstanceWriter(repository, notifier)
        self.operations = Operations(repository, knobs, lambda: self.base_url)
        self.dicomweb = DicomWeb(repository, self.writer, self.operations, lambda: self.base_url)

    def handle(self, call: Call) -> Reply:
        """Route a request under ``/{version}/`` to its method, applying the knobs."""
        for pattern, unserved_method in UNIMPLEMENTED:
            unserved = pattern.match(call.path)
            if unserved:
                name = unserved_method.format(**unserved.groupdict())
                raise ApiError(
                    "UNIMPLEMENTED",
                    f"{name} is not implemented by the localcloud Healthcare emulator, "
                    "which serves the DICOM surface of the API; see docs/emulator.md",
                )
        dicomweb = _DICOMWEB.match(call.path)
        if dicomweb:
            method = _DICOMWEB_METHODS.get(call.http_method)
            if method is None:
                last = call.path.rstrip("/").rsplit("/", 1)[-1]
                searching = last in ("studies", "series", "instances")
                method = "dicomWeb.search" if searching else "dicomWeb.retrieve"
            self._apply_knobs(method)
            store = self._store_name(dicomweb.groupdict())
            self.repository.get_store(store)
            parts = [
                urllib.parse.unquote(p) for p in dicomweb.group("rest").strip("/").split("/") if p
            ]
            return self.dicomweb.handle(
                call.http_method, call.version, store, parts, call.query, call.headers, call.body
            )
        for http_method, pattern, method in ROUTES:
            match = pattern.match(call.path)
            if match and http_method == call.http_method:
                self._apply_knobs(method)
                handler = getattr(self, "_" + method.replace(".", "_"))
                result: dict[str, Any] = handler(call, match.groupdict())
                return json_reply(result, content_type=JSON)
        if any(p.match(call.path) for _, p, _ in ROUTES):
            raise ApiError(
                "UNIMPLEMENTED", f"{call.http_method} is not allowed on {call.path}", 405
            )
        raise not_found(f"resource {call.path}")

    def _apply_knobs(self, method: str) -> None:
        delay = self.knobs.latency_for(method)
        if delay > 0:
            time.sleep(delay)
        status = self.knobs.fault_for(method)
        if status is not None:
            raise ApiError(status_for_http(status), f"injected fault for {method}", status)

    @staticmethod
    def _dataset_name(ids: dict[str, str]) -> str:
        return f"projects/{ids['p']}/locations/{ids['l']}/datasets/{ids['d']}"

    def _store_name(self, ids: dict[str, str]) -> str:
        return f"{self._dataset_name(ids)}/dicomStores/{ids['s']}"

    # methods datasets and DICOM stores share, by kind ("datasets" or "dicomStores")

    def _resource(self, kind: str, ids: dict[str, str]) -> tuple[str, dict[str, Any]]:
        """The name and stored resource of the dataset or DICOM store in ``ids``."""
        if kind == "datasets":
            name = self._dataset_name(ids)
            return name, self.repository.get_dataset(name)
        name = self._store_name(ids)
        return name, self.repository.get_store(name)

    def _patch(self, kind: str, call: Call, ids: dict[str, str]) -> dict[str, Any]:
        """Set the fields the update mask names; a field missing, null or empty is cleared."""
        name, resource = self._resource(kind, ids)
        patchable = _DATASET_PATCHABLE if kind == "datasets" else _PATCHABLE
        mask = _update_mask(call)
        body = call.json()
        for path in mask:
            if path not in patchable:
                raise invalid(
                    f"updateMask path {path!r} cannot be updated; use {sorted(patchable)}"
                )
        for path in mask:
            if body.get(path) in (None, ""):
                resource.pop(path, None)
            else:
                resource[path] = body[path]
        if kind == "datasets":
            self.repository.update_dataset(name, resource)
        else:
            self.repository.update_store(name, resource)
        return resource

    def _get_iam_policy(self, kind: str, call: Call, ids: dict[str, str]) -> dict[str, Any]:
        name, _ = self._resource(kind, ids)
        return iam.get_policy(self.repository, name, call.query)

    def _set_iam_policy(self, kind: str, call: Call, ids: dict[str, str]) -> dict[str, Any]:
        name, _ = self._resource(kind, ids)
        return iam.set_policy(self.repository, name, call.json())

    def _test_iam_permissions(self, kind: str, call: Call, ids: dict[str, str]) -> dict[str, Any]:
        self._resource(kind, ids)
        return iam.granted_permissions(call.json())

    def _delete(self, kind: str, call: Call, ids: dict[str, str]) -> dict[str, Any]:
        if kind == "datasets":
            self.repository.delete_dataset(self._dataset_name(ids))
        else:
            self.repository.delete_store(self._store_name(ids))
        return {}

    _datasets_patch = partialmethod(_patch, "datasets")
    _dicomStores_patch = partialmethod(_patch, "dicomStores")
    _datasets_getIamPolicy = partialmethod(_get_iam_policy, "datasets")
    _dicomStores_getIamPolicy = partialmethod(_get_iam_policy, "dicomStores")
    _datasets_setIamPolicy = partialmethod(_set_iam_policy, "datasets")
    _dicomStores_setIamPolicy = partialmethod(_set_iam_policy, "dicomStores")
    _datasets_testIamPermissions = partialmethod(_test_iam_permissions, "datasets")
    _dicomStores_testIamPermissions = partialmethod(_test_iam_permissions, "dicomStores")
    _datasets_delete = partialmethod(_delete, "datasets")
    _dicomStores_delete = partialmethod(_delete, "dicomStores")

    # datasets

    def _datasets_create(self, call: Call, ids: dict[str, str]) -> dict[str, Any]:
        dataset_id = _check_id("datasetId", call.query.get("datasetId", [""])[-1])
        body = call.json()
        name = f"projects/{ids['p']}/locations/{ids['l']}/datasets/{dataset_id}"
        resource: dict[str, Any] = {"name": name}
        if body.get("timeZone"):
            resource["timeZone"] = str(body["timeZone"])
        self.repository.create_dataset(name, resource)
        return self.operations.start(
            name, "datasets.create", call.version, lambda _: dict(resource), immediate=True
        )

    def _datasets_list(self, call: Call, ids: dict[str, str]) -> dict[str, Any]:
        parent = f"projects/{ids['p']}/locations/{ids['l']}"
        return _page(self.repository.list_datasets(parent), call.query, "datasets", 1000)

    def _datasets_get(self, call: Call, ids: dict[str, str]) -> dict[str, Any]:
        return self.repository.get_dataset(self._dataset_name(ids))

    # dicomStores

    def _dicomStores_create(self, call: Call, ids: dict[str, str]) -> dict[str, Any]:
        dataset = self._dataset_name(ids)
        self.repository.get_dataset(dataset)
        store_id = _check_id("dicomStoreId", call.query.get("dicomStoreId", [""])[-1])
        body = call.json()
        unknown = set(body) - _STORE_FIELDS
        if unknown:
            raise invalid(f"unknown DicomStore fields: {', '.join(sorted(unknown))}")
        resource = {k: v for k, v in body.items() if k != "name"}
        resource = {"name": f"{dataset}/dicomStores/{store_id}", **resource}
        self.repository.create_store(resource["name"], dataset, resource)
        return resource

    def _dicomStores_list(self, call: Call, ids: dict[str, str]) -> dict[str, Any]:
        dataset = self._dataset_name(ids)
        self.repository.get_dataset(dataset)
        return _page(self.repository.list_stores(dataset), call.query, "dicomStores", 1000)

    def _dicomStores_get(self, call: Call, ids: dict[str, str]) -> dict[str, Any]:
        return self.repository.get_store(self._store_name(ids))

    def _import(self, call: Call, ids: dict[str, str]) -> dict[str, Any]:
        store = self._store_name(ids)
        self.repository.get_store(store)
        body = call.json()
        uri = str((body.get("gcsSource") or {}).get("uri", ""))
        try:
            parse_gcs_source(uri)
        except ValueError as exc:
            raise invalid(str(exc)) from None
        return self.operations.start(
            self._dataset_name(ids),
            "import",
            call.version,
            lambda op: run_import(
                op,
                store,
                uri,
                self.storage,
                self.fetch_pool,
                self.writer,
                self.operations.checkpoint,
            ),
            counted=True,
            limited=True,
        )

    def _export(self, call: Call, ids: dict[str, str]) -> dict[str, Any]:
        store = self._store_name(ids)
        self.repository.get_store(store)
        body = call.json()
        destination = body.get("gcsDestination")
        if not isinstance(destination, dict) or not destination.get("uriPrefix"):
            raise invalid("gcsDestination.uriPrefix is required")
        split_gcs_uri(str(destination["uriPrefix"]))
        parse_mime_type(str(destination.get("mimeType", "")))
        filter_config = body.get("filterConfig") or {}
        if not isinstance(filter_config, dict):
            raise invalid("filterConfig must be an object")
        if filter_config.get("resourcePathsGcsUri"):
            split_gcs_uri(str(filter_config["resourcePathsGcsUri"]))
        return self.operations.start(
            self._dataset_name(ids),
            "export",
            call.version,
            lambda op: run_export(
                op,
                self.repository,
                store,
                destination,
                filter_config,
                self.storage,
                self.operations.checkpoint,
            ),
            counted=True,
            limited=True,
        )

    # operations

    def _operations_list(self, call: Call, ids: dict[str, str]) -> dict[str, Any]:
        dataset = self._dataset_name(ids)
        self.repository.get_dataset(dataset)
        operations = self.operations.list_for(dataset)
        text = call.query.get("filter", [""])[-1].strip()
        if text:
            match = re.fullmatch(r"done\s*=\s*(true|false)", text, re.IGNORECASE)
            if not match:
                raise invalid(f"unsupported filter {text!r}; the emulator supports done=true|false")
            wanted = match.group(1).lower() == "true"
            operations = [op for op in operations if bool(op.get("done")) == wanted]
        return _page(operations, call.query, "operations", 1000)

    def _operations_get(self, call: Call, ids: dict[str, str]) -> dict[str, Any]:
        return self.operations.get(f"{self._dataset_name(ids)}/operations/{ids['o']}")

    def _operations_cancel(self, call: Call, ids: dict[str, str]) -> dict[str, Any]:
        self.operations.cancel(f"{self._dataset_name(ids)}/operations/{ids['o']}")
        return {}

    # /_emulator/

    def handle_emulator(self, call: Call) -> Reply:
        if call.path == "knobs":
            if call.http_method == "POST":
                try:
                    self.knobs.update(call.json())
                except ValueError as exc:
                    raise invalid(str(exc)) from None
            return json_reply(self.knobs.as_json(), content_type=JSON)
        if call.path.startswith("logs/") and call.http_method == "GET":
            name = call.path.removeprefix("logs/")
            return json_reply({"entries": self.operations.logs(name)}, content_type=JSON)
        if call.path == "health":
            health = {
                "status": "ok",
                "time": now_rfc3339(),
                "importWorkers": self.fetch_pool.workers,
                "importWorkersReady": self.fetch_pool.ready_workers(),
            }
            return json_reply(health, content_type=JSON)
        raise not_found(f"emulator endpoint {call.path}")


class _Handler(BaseHTTPRequestHandler):
    """Turns HTTP requests into Calls and Replies into HTTP responses."""

    protocol_version = "HTTP/1.1"
    # Without this every response waits for the peer's delayed ACK (~40 ms).
    disable_nagle_algorithm = True
    server: _Server

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PATCH(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def log_message(self, format: str, *args: Any) -> None:
        return  # request lines can carry patient names in query strings

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0] or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _serve(self) -> None:
        api = self.server.api
        try:
            body = self._read_body()
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
            headers = {k.lower(): v for k, v in self.headers.items()}
            path = url.path.lstrip("/")
            version, _, rest = path.partition("/")
            call = Call(self.command, version, rest, query, headers, body)
            if version == "_emulator":
                reply = api.handle_emulator(call)
            elif version in ("v1", "v1beta1"):
                call.path = urllib.parse.unquote(rest)
                reply = api.handle(call)
            else:
                raise not_found(f"resource {url.path}")
        except ApiError as exc:
            reply = json_reply(exc.body(), exc.http_status, JSON)
        except Exception:
            log.exception("unhandled error serving %s %s", self.command, self.path.split("?")[0])
            error = ApiError("INTERNAL", "internal error in the emulator")
            reply = json_reply(error.body(), 500, JSON)
        self.send_response(reply.status)
        if reply.status != 204:  # RFC 9110: a 204 carries neither a body nor its length
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
        for key, value in reply.headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and reply.status != 204:
            self.wfile.write(reply.body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, sock: socket.socket, api: HealthcareApi) -> None:
        self.api = api
        super().__init__((HOST, 0), _Handler, bind_and_activate=False)
        serve_on(self, sock)


class HealthcareServer:
    """A running emulator: ``url`` (no trailing slash), ``port``, ``stop()``.

    It serves on ``listener``, a loopback socket bound and listening (see
    ``localcloud.ports.listening_socket``), and closes it on ``stop()``.
    """

    def __init__(
        self,
        listener: socket.socket,
        data_dir: Path | None,
        storage_endpoint: str | None,
        knobs: Knobs,
        pubsub_endpoint: str | None = None,
        import_workers: int | None = None,
        storage_root: Path | None = None,
    ) -> None:
        self._temp_dir: Path | None = None
        if data_dir is None:
            self._temp_dir = data_dir = Path(tempfile.mkdtemp(prefix="localcloud-healthcare-"))
        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        self.knobs = knobs
        self.repository = Repository(data_dir)
        workers = default_import_workers() if import_workers is None else import_workers
        self.api = HealthcareApi(
            self.repository,
            StorageAccess(storage_endpoint, root=str(storage_root) if storage_root else None),
            knobs,
            Notifier(pubsub_endpoint),
            FetchPool(workers),
        )
        self._httpd = _Server(listener, self.api)
        self.port = int(self._httpd.server_address[1])
        self.url = f"http://{HOST}:{self.port}"
        self.api.base_url = self.url
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True
        )
        self._thread.start()
        self._stopped = False

    def stop(self) -> None:
        """Stop serving, end running operations, close the index; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self.api.operations.stop()
        self.api.fetch_pool.close()
        self.api.notifier.close()
        self.api.storage.close()
        self.repository.close()
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
