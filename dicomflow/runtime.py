"""Per-process state of the functions: settings, clients, and the retry decision.

``handle(name, handler, event)`` is what ``main.py`` calls with a handler of
``dicomflow.functions``. It builds the ``Context`` once per process, runs the handler and
turns errors into the platform's retry semantics:

- ``PermanentError``: logged and returned; retrying cannot help, so don't raise.
- ``TransientError`` (and unexpected errors): raised, so the platform retries.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

import requests
import requests.adapters
from cloudevents.http import CloudEvent
from google.auth.credentials import AnonymousCredentials, Credentials
from google.cloud import storage

from dicomflow import keys, log
from dicomflow.clock import utcnow
from dicomflow.config import Settings, load_settings
from dicomflow.errors import ConfigError, PermanentError
from dicomflow.events import decode_attributes
from dicomflow.json_types import JSON

if TYPE_CHECKING:
    # Imported where first used: both are slow to import, and not every function needs them.
    from dicomweb_client.api import DICOMwebClient
    from googleapiclient.discovery import Resource

logger = logging.getLogger(__name__)

# google-cloud-storage 3.x keeps bucket metadata for its OpenTelemetry spans and, on every
# 404 (an absent marker is a normal answer here), checks in a background thread whether
# the bucket still exists: a buckets.get per absent read. dicomflow exports no such spans.
os.environ.setdefault("DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA", "true")

# Connections kept per host by the Cloud Storage client (see make_context).
STORAGE_POOL_SIZE = 64


@dataclass
class Context:
    """Settings and clients of one process. Tests build one with their own clients."""

    settings: Settings
    storage: storage.Client
    credentials: Credentials | None = None
    clock: Callable[[], datetime] = utcnow
    _local: threading.local = field(default_factory=threading.local, repr=False)

    def healthcare(self) -> Resource:
        """A Healthcare v1 client for this thread (googleapiclient is not thread-safe)."""
        svc = getattr(self._local, "healthcare", None)
        if svc is None:
            svc = self._local.healthcare = _discovery(
                "healthcare", self.settings.healthcare_endpoint, self.credentials
            )
        return svc

    def pubsub(self) -> Resource:
        """A Pub/Sub v1 REST client for this thread."""
        svc = getattr(self._local, "pubsub", None)
        if svc is None:
            svc = self._local.pubsub = _discovery(
                "pubsub", self.settings.pubsub_endpoint, self.credentials
            )
        return svc

    def close_clients(self) -> None:
        """Close this thread's API clients (their keep-alive sockets); they reopen on next use."""
        for name in ("healthcare", "pubsub"):
            client = getattr(self._local, name, None)
            if client is not None:
                client.close()
                delattr(self._local, name)
        session = getattr(self._local, "dicomweb_session", None)
        if session is not None:
            session.close()
            del self._local.dicomweb_session
            del self._local.dicomweb

    def dicomweb_url(self) -> str:
        """The store's DICOMweb root: ``.../dicomStores/STORE/dicomWeb``."""
        return f"{self.settings.healthcare_api_root}v1/{self.settings.dicom_store.dicomweb_path}"

    def dicomweb_session(self) -> requests.Session:
        """The requests session of this thread's DICOMweb client (for raw requests)."""
        self.dicomweb()
        session: requests.Session = self._local.dicomweb_session
        return session

    def dicomweb(self) -> DICOMwebClient:
        """A dicomweb-client for the store, for this thread, on a session this Context owns."""
        client: DICOMwebClient | None = getattr(self._local, "dicomweb", None)
        if client is None:
            from dicomweb_client.api import DICOMwebClient

            if self.settings.healthcare_endpoint:
                session = requests.Session()
            else:
                from dicomweb_client.ext.gcp.session_utils import (
                    create_session_from_gcp_credentials,
                )

                session = create_session_from_gcp_credentials(self.credentials)
            client = DICOMwebClient(url=self.dicomweb_url(), session=session)
            self._local.dicomweb_session = session
            self._local.dicomweb = client
        return client


def _discovery(api: str, endpoint: str | None, credentials: Credentials | None) -> Resource:
    from googleapiclient.discovery import build

    options = {"api_endpoint": endpoint.rstrip("/") + "/"} if endpoint else None
    if endpoint and credentials is None:
        credentials = AnonymousCredentials()  # type: ignore[no-untyped-call]
    return build(
        api,
        "v1",
        static_discovery=True,
        cache_discovery=False,
        client_options=options,
        credentials=credentials,
    )


def make_context(settings: Settings) -> Context:
    """Clients for ``settings``: emulator endpoints when set, default credentials otherwise."""
    if settings.storage_emulator_host:
        client = storage.Client(
            project="local",
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            client_options={"api_endpoint": settings.storage_emulator_host},
        )
    else:
        client = storage.Client()
    # The client's one requests session is shared by the worker threads of a tick (up to
    # report.VERIFY_BATCHES_AT_ONCE x verify.THREADS); urllib3's default pool of 10 would
    # open and drop a connection for each call beyond that.
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=STORAGE_POOL_SIZE)
    client._http.mount("https://", adapter)
    client._http.mount("http://", adapter)
    return Context(settings=settings, storage=client)


_context: Context | None = None
_context_lock = threading.Lock()


def context() -> Context:
    """The process's Context, built on first use."""
    global _context
    with _context_lock:
        if _context is None:
            log.configure()
            settings = load_settings()
            # The key is read at start-up: a missing or unreadable one fails it, and from
            # here on the logs carry keyed labels, the same as the alerts.
            log.use_labels(log.Labels(keys.load(settings), settings.is_pipeline_object))
            _context = make_context(settings)
        return _context


def startup() -> None:
    """Fail the process at start-up on bad settings when serving on Cloud Run (or localcloud).

    Cloud Run sets ``K_SERVICE``; there a bad setting stops the worker from
    booting, with one CRITICAL log line naming the setting and the fix, instead
    of failing (and retrying) every event. Elsewhere (tests, the CLI) settings
    are read on first use.
    """
    if not os.environ.get("K_SERVICE"):
        return
    try:
        context()
    except ConfigError as exc:
        logger.critical("bad configuration: %s", exc, extra=log.fields(setting=exc.setting))
        raise SystemExit(3) from None


def set_context(ctx: Context | None) -> None:
    """Replace the process's Context (tests)."""
    global _context
    with _context_lock:
        _context = ctx


def handle(
    function: str, handler: Callable[[Context, CloudEvent], JSON], event: CloudEvent
) -> JSON:
    """Run ``handler`` (the function named ``function``) on ``event`` and apply the retry rule."""
    event = decode_attributes(event)
    ctx = context()
    started = time.monotonic()
    event_id = event["id"]
    try:
        result: JSON = handler(ctx, event)
    except PermanentError as exc:
        # Retrying cannot fix this, so don't raise: log it and let the event go.
        logger.error(
            "permanent error: %s",
            exc,
            extra=log.fields(function=function, eventId=event_id, errorType=type(exc).__name__),
        )
        return {"status": "permanent_error", "error": str(exc)}
    logger.debug(
        "handled",
        extra=log.fields(
            function=function, eventId=event_id, ms=round((time.monotonic() - started) * 1000)
        ),
    )
    return result
