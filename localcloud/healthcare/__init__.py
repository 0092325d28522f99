"""An emulator of the Cloud Healthcare API's DICOM surface (v1 and v1beta1).

Start it in process with ``start_healthcare()``, or as a process with
``python -m localcloud.healthcare``. It persists to a data directory (SQLite
index plus blob files), reads and writes Cloud Storage through
google-cloud-storage (fake-gcs-server or the real service), and has knobs for
latency, a concurrency quota and fault injection (see ``knobs``).

Module map: ``server`` (HTTP and REST resources), ``operations`` (long-running
operations), ``importer`` / ``exporter`` (the import and export operations),
``dicomweb`` (QIDO/WADO/STOW), ``instances`` (DICOM parsing and rendering),
``repository`` (persistence), ``wildcards`` (import URI patterns), ``knobs``,
``status`` (Google errors), ``gcs`` (Cloud Storage access).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from localcloud.healthcare.knobs import Knobs
from localcloud.healthcare.server import HealthcareServer
from localcloud.ports import listening_socket

__all__ = ["HealthcareServer", "start_healthcare"]


def start_healthcare(
    port: int = 0,
    data_dir: Path | None = None,
    storage_endpoint: str | None = None,
    pubsub_endpoint: str | None = None,
    import_workers: int | None = None,
    storage_root: Path | None = None,
    listener: socket.socket | None = None,
    **knobs: Any,
) -> HealthcareServer:
    """Start the emulator on loopback, serving from a background thread.

    Args:
        port: 0 for any free port; ignored when ``listener`` is given.
        data_dir: where the index and blobs live; None uses a temp dir removed on stop.
        storage_endpoint: the fake-gcs-server URL; None means real Cloud Storage.
        pubsub_endpoint: the Pub/Sub REST URL that store notifications go to; None
            drops them with a warning.
        import_workers: processes that read and parse import sources (None: one per
            core, at least two; 0: in the operation's thread).
        storage_root: the filesystem root of the fake-gcs-server at ``storage_endpoint``
            (``-backend filesystem``); imports then read its object files directly,
            checked against the listing's size and MD5 (see ``fetch``).
        listener: a loopback socket bound and listening to serve on, e.g. one
            inherited from the process that started this one; the server owns it.
        **knobs: operation_latency, max_concurrent_ops, faults, latency (see ``knobs``).

    Raises:
        LocalCloudError: the port is taken.
        ValueError: a knob value is invalid.
    """
    settings = Knobs()
    settings.update(knobs)
    if listener is None:
        listener = listening_socket(
            port, "the Cloud Healthcare API emulator", "LOCALCLOUD_HEALTHCARE_PORT"
        )
    try:
        return HealthcareServer(
            listener,
            data_dir,
            storage_endpoint,
            settings,
            pubsub_endpoint,
            import_workers,
            storage_root,
        )
    except BaseException:
        listener.close()
        raise
