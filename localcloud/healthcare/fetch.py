"""Fetching and checking import sources in worker processes.

Reading a file from Cloud Storage and parsing its header take most of an
import's time and hold the GIL, so an import spreads them over a pool of
processes; the parent only decides and records (``importer``). Each worker
keeps one keep-alive connection to the storage endpoint and reads objects with
plain JSON-API media GETs, which cost a fraction of a google-cloud-storage
download. Without an endpoint (the real Cloud Storage) workers use
google-cloud-storage with Application Default Credentials.

When the endpoint is a local fake-gcs-server with the filesystem backend and
the emulator knows its root (``storage_root``), a worker reads an object's
file from that root instead of asking the server for it: an HTTP round trip
through the storage front and fake-gcs-server costs about 0.5 ms of CPU per
object, several times the parse. The bytes count only when their length and
MD5 equal those the listing gave for the object; anything else (no such file,
another layout, a write in between, an object without an MD5 or with a
Content-Encoding: ``gcs.StorageAccess.list_objects``) reads through the
endpoint instead, so both ways return what a read of the listed object does.

A worker that dies is replaced; the chunk it held fails its import.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import pickle
import queue
import subprocess
import sys
import threading
import urllib.parse
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

from localcloud.healthcare.instances import InstanceRejected, ParsedInstance, parse_instance

# One listed object: (name, size in bytes, base64 MD5 or "" when the listing gave none).
Source = tuple[str, int, str]


class Candidate(NamedTuple):
    """One examined file: its bytes, hash and index entry, or why it cannot be stored.

    ``error`` is (gRPC code, message) of a per-file failure. A tuple, since a
    worker pickles hundreds of them per chunk.
    """

    source: str
    data: bytes
    sha256: str
    parsed: ParsedInstance | None
    error: tuple[int, str] | None


def examine(source: str, data: bytes) -> Candidate:
    """Hash and parse one file."""
    sha = hashlib.sha256(data).hexdigest()
    try:
        return Candidate(source, data, sha, parse_instance(data), None)
    except InstanceRejected as exc:
        return Candidate(source, data, sha, None, (exc.code, exc.message))


def local_object_path(root: Path, bucket: str, name: str) -> Path | None:
    """Where fake-gcs-server's filesystem backend keeps ``name``; None for a name it cannot.

    Names with empty, ``.`` or ``..`` segments, or a NUL, never map to a file under
    ``root/bucket``: they are read through the endpoint.
    """
    parts = name.split("/")
    if bucket in ("", ".", "..") or "/" in bucket or "\0" in name:
        return None
    if any(part in ("", ".", "..") for part in parts):
        return None
    return root.joinpath(bucket, *parts)


class _Reader:
    """Reads objects of one storage endpoint over a kept-alive connection, or from its root."""

    def __init__(self, endpoint: str | None, root: str | None) -> None:
        self.endpoint = endpoint
        self.root = Path(root) if root and endpoint else None
        self._connection: http.client.HTTPConnection | None = None
        self._client: Any = None

    def close(self) -> None:
        """Close the kept-alive connection; the next read opens another."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def read(self, bucket: str, source: Source) -> bytes:
        name, size, md5 = source
        if self.root is not None and md5:
            data = self._read_file(bucket, name, size, md5)
            if data is not None:
                return data
        return self._read_endpoint(bucket, name)

    def _read_file(self, bucket: str, name: str, size: int, md5: str) -> bytes | None:
        """The listed object's bytes from the backend's file, or None when they are not."""
        assert self.root is not None
        path = local_object_path(self.root, bucket, name)
        if path is None:
            return None
        try:
            with open(path, "rb") as handle:
                data = handle.read(size + 1)
        except OSError:
            return None
        if len(data) != size:
            return None
        if base64.b64encode(hashlib.md5(data).digest()).decode() != md5:
            return None
        return data

    def _read_endpoint(self, bucket: str, name: str) -> bytes:
        if self.endpoint is None:
            if self._client is None:
                from google.cloud import storage

                self._client = storage.Client()
            data: bytes = self._client.bucket(bucket).blob(name).download_as_bytes()
            return data
        path = (
            f"{urllib.parse.urlsplit(self.endpoint).path.rstrip('/')}/storage/v1/b/"
            f"{urllib.parse.quote(bucket, safe='')}/o/{urllib.parse.quote(name, safe='')}"
            "?alt=media"
        )
        for attempt in (1, 2):
            if self._connection is None:
                url = urllib.parse.urlsplit(self.endpoint)
                self._connection = http.client.HTTPConnection(url.netloc, timeout=60)
            try:
                self._connection.request("GET", path)
                response = self._connection.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException):
                # A kept-alive connection the server closed: reconnect once.
                self._connection.close()
                self._connection = None
                if attempt == 2:
                    raise
                continue
            if response.status != 200:
                raise OSError(f"HTTP {response.status} reading gs://{bucket}/{name}")
            return body
        raise AssertionError("unreachable")


_READERS: dict[tuple[str | None, str | None], _Reader] = {}
# What a worker is asked: (endpoint, storage root, bucket, the listed objects).
Request = tuple[str | None, str | None, str, list[Source]]


def close_readers() -> None:
    """Close this process's storage connections (chunks read in the calling thread)."""
    for reader in list(_READERS.values()):
        reader.close()


def fetch_chunk(
    endpoint: str | None, root: str | None, bucket: str, sources: list[Source]
) -> list[Candidate]:
    """Read and examine ``sources`` in order (runs in a worker process)."""
    reader = _READERS.get((endpoint, root))
    if reader is None:
        reader = _READERS[endpoint, root] = _Reader(endpoint, root)
    found = []
    for listed in sources:
        source = f"gs://{bucket}/{listed[0]}"
        try:
            data = reader.read(bucket, listed)
        except Exception as exc:
            # A vanished or unreadable object fails alone, like any other per-file error.
            found.append(Candidate(source, b"", "", None, (5, f"cannot read: {exc}")))
            continue
        found.append(examine(source, data))
    return found


class _Worker:
    """One worker process: a pickled ``Request`` in, pickled result out.

    The worker says it is ready once its imports are done; ``ready`` is set then
    (or when it dies first, so that a call fails instead of waiting).
    """

    def __init__(self) -> None:
        package_root = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "localcloud.healthcare.fetch_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": path},
        )
        self.ready = threading.Event()
        self.started = False
        threading.Thread(target=self._await_ready, name="fetch-worker-start", daemon=True).start()

    def _await_ready(self) -> None:
        assert self.process.stdout is not None
        try:
            self.started = pickle.load(self.process.stdout) == ("ready", None)
        except (OSError, EOFError, pickle.UnpicklingError, ValueError):
            self.started = False
        self.ready.set()

    def call(self, request: Request) -> list[Candidate]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.ready.wait()
        if not self.started:
            raise EOFError("the worker ended before it was ready")
        pickle.dump(request, self.process.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        self.process.stdin.flush()
        status, value = pickle.load(self.process.stdout)
        if status != "ok":
            raise RuntimeError(f"import worker failed: {value}")
        result: list[Candidate] = value
        return result

    def stop(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


class WorkerDied(Exception):
    """A worker process exited or broke its pipe in the middle of a chunk."""


class FetchPool:
    """Worker processes for ``fetch_chunk``; ``workers`` 0 runs chunks in the calling thread.

    The workers are plain ``python -m localcloud.healthcare.fetch_worker`` processes fed
    through pipes, not multiprocessing's, which would re-import the embedding
    program's ``__main__`` in each child. They start with the emulator, so the
    first import does not wait for their imports, and they exit when their pipe
    closes, including when the emulator dies.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        self._threads = ThreadPoolExecutor(max(1, workers), thread_name_prefix="fetch-pool")
        for _ in range(workers):
            self._idle.put(self._new_worker())

    def _new_worker(self) -> _Worker:
        worker = _Worker()
        with self._lock:
            self._all.append(worker)
        return worker

    def submit(self, request: Request) -> Future[list[Candidate]]:
        if not self.workers:
            done: Future[list[Candidate]] = Future()
            done.set_result(fetch_chunk(*request))
            return done
        return self._threads.submit(self._run, request)

    def _run(self, request: Request) -> list[Candidate]:
        worker = self._idle.get()
        try:
            result = worker.call(request)
        except (OSError, EOFError, pickle.UnpicklingError) as exc:
            worker.process.kill()
            with self._lock:
                self._all.remove(worker)
                closed = self._closed
            if not closed:
                self._idle.put(self._new_worker())
            raise WorkerDied(str(exc) or type(exc).__name__) from None
        self._idle.put(worker)
        return result

    def ready_workers(self) -> int:
        """Workers that have finished starting and can take a chunk now."""
        with self._lock:
            return sum(1 for worker in self._all if worker.ready.is_set() and worker.started)

    def close(self) -> None:
        """Let running chunks finish, then end every worker."""
        with self._lock:
            self._closed = True
        self._threads.shutdown(wait=True, cancel_futures=True)
        if not self.workers:
            close_readers()
        with self._lock:
            workers, self._all = self._all, []
        for worker in workers:
            worker.stop()


def serve() -> None:
    """The worker loop: say it is ready, then answer requests on stdin until it closes."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    pickle.dump(("ready", None), stdout, protocol=pickle.HIGHEST_PROTOCOL)
    stdout.flush()
    while True:
        try:
            request: Request = pickle.load(stdin)
        except EOFError:
            return
        try:
            reply: tuple[str, object] = ("ok", fetch_chunk(*request))
        except Exception as exc:
            # Reported to the parent, which fails the import with it.
            reply = ("error", f"{type(exc).__name__}: {exc}")
        pickle.dump(reply, stdout, protocol=pickle.HIGHEST_PROTOCOL)
        stdout.flush()
