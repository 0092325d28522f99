"""Cloud Storage access for import and export, through google-cloud-storage.

With an endpoint (fake-gcs-server) the client is anonymous; without one it is
the real service with Application Default Credentials. ``root`` is the
filesystem root of that fake-gcs-server when the emulator may read its object
files directly (see ``fetch``). Transfers run on one
long-lived pool of worker threads, each with its own client (the library does
not promise that one is safe to share); ``close()`` ends both.
"""

from __future__ import annotations

import http.client
import json
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from localcloud.healthcare.status import ApiError


def split_gcs_uri(uri: str) -> tuple[str, str]:
    """``gs://bucket/path`` -> (bucket, path).

    Raises:
        ApiError: INVALID_ARGUMENT when the URI is not gs://BUCKET[/PATH].
    """
    if not uri.startswith("gs://") or not uri[5:].split("/", 1)[0]:
        raise ApiError(
            "INVALID_ARGUMENT", f"invalid Cloud Storage URI {uri!r}: expected gs://BUCKET/PATH"
        )
    bucket, _, path = uri[5:].partition("/")
    return bucket, path


def _plain_md5(md5: str | None, content_encoding: str | None) -> str:
    """The listed MD5 when it is that of what a read returns, else ""."""
    if content_encoding and content_encoding.strip().lower() != "identity":
        return ""
    return md5 or ""


class StorageAccess:
    """Per-thread storage clients for one endpoint."""

    def __init__(self, endpoint: str | None, workers: int = 8, root: str | None = None) -> None:
        self.endpoint = endpoint
        self.root = root if endpoint else None
        self._base_path = urllib.parse.urlsplit(endpoint).path.rstrip("/") if endpoint else ""
        self._local = threading.local()
        self._clients: list[storage.Client] = []
        self._connections: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="gcs-transfer")

    def close(self) -> None:
        """Stop the worker threads and close every client's connections."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            clients, self._clients = self._clients, []
            connections, self._connections = self._connections, []
        for found in clients:
            found.close()
        for connection in connections:
            connection.close()

    def client(self) -> storage.Client:
        found: storage.Client | None = getattr(self._local, "client", None)
        if found is None:
            if self.endpoint:
                found = storage.Client(
                    project="localcloud",
                    credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
                    client_options={"api_endpoint": self.endpoint},
                )
            else:
                found = storage.Client()
            self._local.client = found
            with self._lock:
                self._clients.append(found)
        return found

    def list_objects(self, bucket: str, prefix: str) -> list[tuple[str, int, str]]:
        """(name, size, base64 MD5) of every object under ``prefix``.

        The MD5 is "" when the listing gives none, and for an object with a
        Content-Encoding: a read serves it decoded (fake-gcs-server, like Cloud
        Storage, decompresses gzip for a client that does not ask for it), so the
        MD5 of the stored bytes says nothing about what a read returns. Against an
        endpoint, plain JSON-API pages with only those fields, at the server's page
        size: fake-gcs-server walks the whole bucket for every page.

        Raises:
            ApiError: NOT_FOUND when the bucket does not exist.
        """
        if not self.endpoint:
            try:
                return [
                    (b.name, int(b.size or 0), _plain_md5(b.md5_hash, b.content_encoding))
                    for b in self.client().list_blobs(bucket, prefix=prefix)
                ]
            except gexc.NotFound:
                raise ApiError("NOT_FOUND", f"Cloud Storage bucket {bucket} not found") from None
        found: list[tuple[str, int, str]] = []
        token = ""
        while True:
            fields = "items(name,size,md5Hash,contentEncoding),nextPageToken"
            query = {"prefix": prefix, "fields": fields}
            if token:
                query["pageToken"] = token
            path = f"{self._base_path}/storage/v1/b/{urllib.parse.quote(bucket, safe='')}/o"
            status, body = self._request("GET", f"{path}?{urllib.parse.urlencode(query)}")
            if status == 404:
                raise ApiError("NOT_FOUND", f"Cloud Storage bucket {bucket} not found")
            if status != 200:
                raise OSError(f"HTTP {status} listing gs://{bucket}/{prefix}: {body[:200]!r}")
            page = json.loads(body)
            found.extend(
                (
                    item["name"],
                    int(item.get("size") or 0),
                    _plain_md5(item.get("md5Hash"), item.get("contentEncoding")),
                )
                for item in page.get("items", [])
            )
            token = page.get("nextPageToken") or ""
            if not token:
                return found

    def download(self, bucket: str, name: str) -> bytes:
        data: bytes = self.client().bucket(bucket).blob(name).download_as_bytes()
        return data

    def upload(self, bucket: str, name: str, data: bytes, content_type: str) -> None:
        """Write one object; against an endpoint, as one plain JSON-API media upload.

        google-cloud-storage costs several times the request itself per small
        object, which is most of an export's time.
        """
        if not self.endpoint:
            self.client().bucket(bucket).blob(name).upload_from_string(
                data, content_type=content_type
            )
            return
        query = urllib.parse.urlencode({"uploadType": "media", "name": name})
        path = f"{self._base_path}/upload/storage/v1/b/{urllib.parse.quote(bucket, safe='')}/o"
        status, body = self._request("POST", f"{path}?{query}", data, content_type)
        if status == 404:
            raise ApiError("NOT_FOUND", f"Cloud Storage bucket {bucket} not found")
        if status != 200:
            raise OSError(f"HTTP {status} writing gs://{bucket}/{name}: {body[:200]!r}")

    def _request(
        self, method: str, path: str, body: bytes = b"", content_type: str = ""
    ) -> tuple[int, bytes]:
        """One request on this thread's kept-alive connection to the endpoint."""
        for attempt in (1, 2):
            connection: http.client.HTTPConnection | None = getattr(self._local, "http", None)
            if connection is None:
                netloc = urllib.parse.urlsplit(self.endpoint or "").netloc
                connection = self._local.http = http.client.HTTPConnection(netloc, timeout=60)
                with self._lock:
                    self._connections.append(connection)
            try:
                headers = {"Content-Type": content_type} if content_type else {}
                connection.request(method, path, body or None, headers)
                response = connection.getresponse()
                return response.status, response.read()
            except (OSError, http.client.HTTPException):
                # A kept-alive connection the server closed: reconnect once.
                connection.close()
                self._local.http = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def require_bucket(self, bucket: str) -> None:
        """Raises ApiError NOT_FOUND when ``bucket`` does not exist."""
        try:
            self.client().get_bucket(bucket)
        except gexc.NotFound:
            raise ApiError("NOT_FOUND", f"Cloud Storage bucket {bucket} not found") from None
